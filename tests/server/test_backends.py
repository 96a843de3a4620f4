"""The fast paths of the runner: every backend gives eager's logits and maps, padding to a bucket changes
nothing, and normalising uint8 pixels in the batch (on the host or, as on CUDA, after the copy) equals
the reference preprocessing."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from models import SAMPLES_DIR
from server.assembly import BatchAssembler, batch_buckets, bucket_for, split_into_buckets
from server.backends.eager import EagerBackend
from server.config import ModelSettings
from server.errors import StartupError
from server.loading import load_model
from server.preprocess import ImageSpec, decode_image, load_pixels
from server.runner import BatchItem, ModelRunner
from tests.reference import preprocess

TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(scope="module")
def eager() -> ModelRunner:
    return ModelRunner.from_settings(ModelSettings(backend="eager"), max_batch_size=8)


def _assembler(runner: ModelRunner, **kwargs) -> BatchAssembler:
    """An assembler for the runner's model, as the runner makes its own (on the CPU, float32)."""
    d = runner.description
    return BatchAssembler(d.input_size, d.mean, d.std, **kwargs)


def _spec(runner: ModelRunner) -> ImageSpec:
    d = runner.description
    return ImageSpec(d.input_size, d.mean, d.std, 10_000_000)


def _pixels(n: int, runner: ModelRunner, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (*runner.description.input_size, 3)
    return [torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator) for _ in range(n)]


def _assert_same(got, want) -> None:
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.logits, b.logits, **TOLERANCE)
        assert a.maps.keys() == b.maps.keys()
        for block, kinds in a.maps.items():
            for kind, values in kinds.items():
                torch.testing.assert_close(values, b.maps[block][kind], **TOLERANCE)


def _mixed_batch(runner: ModelRunner) -> list[BatchItem]:
    blocks = runner.description.attention_blocks
    pixels = _pixels(3, runner)
    return [
        BatchItem(pixels[0]),
        BatchItem(pixels[1], frozenset(blocks)),
        BatchItem(pixels[2], frozenset(blocks[:1])),
    ]


def test_fused_normalisation_equals_the_reference_preprocessing(eager: ModelRunner) -> None:
    spec = _spec(eager)
    images = [Image.fromarray(p.numpy()) for p in _pixels(4, eager)]
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    pixels = [load_pixels(data, spec) for data in encoded]
    assert all(p.dtype == torch.uint8 and p.shape == (*spec.input_size, 3) for p in pixels)
    with torch.inference_mode():
        batch = _assembler(eager).assemble(pixels)
    reference = torch.stack([preprocess(data, spec) for data in encoded])
    assert batch.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(batch, reference, rtol=0, atol=2e-6)


def test_uint8_normalised_after_the_copy_equals_the_host_path(eager: ModelRunner) -> None:
    # The CUDA path (uint8 into a staging buffer, one copy, normalise there), run on the CPU.
    pixels = _pixels(3, eager)
    with torch.inference_mode():
        host = _assembler(eager, staging=False).assemble(pixels).clone()
        staged = _assembler(eager, staging=True).assemble(pixels).clone()
    assert torch.equal(host, staged)


def test_float_tensors_and_pixels_share_a_batch(eager: ModelRunner) -> None:
    spec = _spec(eager)
    pixels = _pixels(2, eager)
    as_float = preprocess(_png(pixels[1]), spec)
    assembler = _assembler(eager)
    with torch.inference_mode():
        batch = assembler.assemble([pixels[0], as_float]).clone()
        alone = assembler.assemble([pixels[1]])
    torch.testing.assert_close(batch[1], alone[0], rtol=0, atol=2e-6)


def _png(pixels: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("pad", "with_maps", "shapes"), [(True, True, [4]), (True, False, [4]), (False, False, [2, 1])]
)
def test_bucket_sized_batches_change_no_result(eager: ModelRunner, pad, with_maps, shapes) -> None:
    # Padded up to the bucket (as on CUDA) or split into buckets (as on the CPU): the same answers.
    assert batch_buckets(8) == [1, 2, 4, 8] and batch_buckets(12) == [1, 2, 4, 8, 12]
    assert [bucket_for(n, [1, 2, 4, 8]) for n in (1, 3, 5, 8, 9)] == [1, 4, 8, 8, 9]
    assert split_into_buckets(17, [1, 2, 4, 8, 16]) == [16, 1] and split_into_buckets(7, [1, 2, 4]) == [
        4,
        2,
        1,
    ]
    items = _mixed_batch(eager) if with_maps else [BatchItem(p) for p in _pixels(3, eager)]
    unpadded = eager.run_batch(items)
    seen: list[int] = []

    class Static(EagerBackend):
        batch_shapes = "pad" if pad else "split"

        def run(self, x, blocks):
            seen.append(x.shape[0])
            return super().run(x, blocks)

    model, meta = load_model(ModelSettings())
    static = ModelRunner(model, meta, backend=Static(model), max_batch_size=8)
    _assert_same(static.run_batch(items), unpadded)
    assert seen == shapes


def test_maps_reach_the_host_only_for_the_requests_that_asked(eager: ModelRunner) -> None:
    items = _mixed_batch(eager)
    outputs = eager.run_batch(items)
    blocks = eager.description.attention_blocks
    assert outputs[0].maps == {}
    assert list(outputs[1].maps) == list(blocks) and list(outputs[2].maps) == [blocks[0]]
    for row in (1, 2):
        (alone,) = eager.run_batch([items[row]])
        _assert_same([outputs[row]], [alone])


@pytest.mark.slow
def test_onnxruntime_matches_eager(eager: ModelRunner) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    runner = ModelRunner.from_settings(ModelSettings(backend="onnxruntime"), max_batch_size=8)
    runner.warm_up([1, 2])  # also checks itself against eager
    assert runner.description.backend == "onnxruntime"
    items = _mixed_batch(runner)
    _assert_same(runner.run_batch(items), eager.run_batch(items))


def test_onnxruntime_refuses_bfloat16() -> None:
    pytest.importorskip("onnxruntime")
    with pytest.raises(StartupError, match="model.backend"):
        ModelRunner.from_settings(ModelSettings(backend="onnxruntime", dtype="bfloat16", device="cpu"))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")  # Inductor's own imports
def test_compile_matches_eager(eager: ModelRunner) -> None:
    # One bucket (max_batch_size 1) keeps this to two compilations of the smallest model.
    runner = ModelRunner.from_settings(ModelSettings(backend="compile"), max_batch_size=1)
    runner.warm_up([1])  # builds both graphs and checks them against eager
    for item in _mixed_batch(runner):
        _assert_same(runner.run_batch([item]), eager.run_batch([item]))


def test_a_given_backend_is_served_as_given() -> None:
    model, meta = load_model(ModelSettings())
    calls: list[int] = []

    class Spy(torch.nn.Module):
        attention_blocks = model.attention_blocks

        def forward(self, x):
            calls.append(x.shape[0])
            return model(x)

    runner = ModelRunner(model, meta, backend=EagerBackend(Spy()), max_batch_size=2)
    runner.run_batch([BatchItem(p) for p in _pixels(2, runner)])
    assert calls == [2] and runner.description.backend == "eager"


def test_draft_decoding_keeps_the_top_1_of_full_decoding(eager: ModelRunner) -> None:
    # The samples, upscaled to 256 x 256 and saved as JPEG: draft mode decodes them at 1/8 scale.
    spec = _spec(eager)
    names = sorted(p.name for p in SAMPLES_DIR.glob("*.png"))
    draft, full = [], []
    for name in names:
        image = Image.open(SAMPLES_DIR / name).convert("RGB").resize((256, 256), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        data = buffer.getvalue()
        assert decode_image(data, spec.max_pixels, draft_size=(32, 32)).size == (32, 32)
        assert decode_image(data, spec.max_pixels).size == (256, 256)
        draft.append(BatchItem(load_pixels(data, spec)))
        full.append(BatchItem(preprocess(data, spec)))  # the reference: full decode, one resize
    got = [out.logits.argmax().item() for out in eager.run_batch(draft)]
    want = [out.logits.argmax().item() for out in eager.run_batch(full)]
    assert got == want
    labels = [int(name[5]) for name in names]
    assert np.mean(np.asarray(got) == np.asarray(labels)) >= 0.9
