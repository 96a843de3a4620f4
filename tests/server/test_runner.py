"""ModelRunner: batched equals unbatched, maps only when asked and only what was asked, device and
dtype choices refused with the field's name."""

from __future__ import annotations

import pytest
import torch

from server.config import ModelSettings
from server.errors import OutOfMemory, StartupError
from server.loading import load_model, resolve_device
from server.runner import BatchItem, ModelRunner, warm_up_sizes


@pytest.fixture(scope="module")
def served() -> tuple[ModelRunner, torch.nn.Module]:
    """The default model served eagerly, and the module it calls (for tests to watch or break)."""
    model, meta = load_model(ModelSettings())
    return ModelRunner(model, meta, backend="eager"), model


@pytest.fixture(scope="module")
def runner(served) -> ModelRunner:
    return served[0]


def _images(n: int, runner: ModelRunner) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(3, *runner.description.input_size, generator=generator) for _ in range(n)]


def test_default_model_is_described(runner: ModelRunner) -> None:
    d = runner.description
    assert d.arch and d.version and len(d.labels) >= 2 and d.attention_blocks
    assert d.device == "cpu" and d.dtype == "float32" and d.num_parameters > 0


def test_batched_equals_unbatched(runner: ModelRunner) -> None:
    images = _images(5, runner)
    batched = runner.run_batch([BatchItem(x) for x in images])
    for x, out in zip(images, batched, strict=True):
        (alone,) = runner.run_batch([BatchItem(x)])
        torch.testing.assert_close(out.logits, alone.logits, atol=1e-4, rtol=1e-4)
        assert out.maps == {}


def test_maps_only_when_asked_and_only_the_blocks_asked(served, monkeypatch) -> None:
    runner, model = served
    blocks = runner.description.attention_blocks
    calls: list[object] = []
    original = model.forward_with_attention

    def spy(x, blocks=None):
        calls.append(blocks)
        return original(x, blocks=blocks)

    monkeypatch.setattr(model, "forward_with_attention", spy)
    images = _images(3, runner)
    runner.run_batch([BatchItem(x) for x in images])
    assert calls == []  # nobody asked: the plain forward

    outputs = runner.run_batch(
        [
            BatchItem(images[0]),
            BatchItem(images[1], frozenset({blocks[0]})),
            BatchItem(images[2], frozenset({blocks[-1]})),
        ]
    )
    assert calls == [sorted({blocks[0], blocks[-1]})]  # the union of what was asked, nothing more
    assert outputs[0].maps == {}
    assert list(outputs[1].maps) == [blocks[0]] and list(outputs[2].maps) == [blocks[-1]]
    _, truth = original(images[1].unsqueeze(0), blocks=[blocks[0]])
    torch.testing.assert_close(
        outputs[1].maps[blocks[0]]["spatial"], truth[blocks[0]].spatial[0], atol=1e-5, rtol=0
    )


def test_channels_last_does_not_change_results() -> None:
    a = ModelRunner.from_settings(ModelSettings(channels_last=True, backend="eager"))
    b = ModelRunner.from_settings(ModelSettings(channels_last=False, backend="eager"))
    images = [BatchItem(x) for x in _images(4, a)]
    for x, y in zip(a.run_batch(images), b.run_batch(images), strict=True):
        torch.testing.assert_close(x.logits, y.logits, atol=1e-4, rtol=1e-4)


def test_random_weights_for_an_architecture() -> None:
    settings = ModelSettings(arch="cbam_resnet8_cifar", num_classes=7, backend="eager")
    r = ModelRunner.from_settings(settings)
    assert r.description.labels == tuple(f"class_{i}" for i in range(7))
    assert r.description.input_size == (32, 32) and r.description.mean == (0.485, 0.456, 0.406)
    again = ModelRunner.from_settings(settings)
    x = [BatchItem(t) for t in _images(1, r)]
    torch.testing.assert_close(
        r.run_batch(x)[0].logits, again.run_batch(x)[0].logits
    )  # same seed, same weights


def test_bfloat16_runs_on_cpu() -> None:
    r = ModelRunner.from_settings(ModelSettings(dtype="bfloat16", device="cpu"))
    r.warm_up([1, 2])
    (out,) = r.run_batch([BatchItem(_images(1, r)[0])])
    assert r.description.dtype == "bfloat16" and out.logits.dtype == torch.float32


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        (ModelSettings(dtype="float16", device="cpu"), "model.dtype"),
        (ModelSettings(arch="no_such_net"), "model.arch"),
    ],
)
def test_settings_that_cannot_be_served_name_the_field(settings: ModelSettings, field: str) -> None:
    with pytest.raises(StartupError) as info:
        ModelRunner.from_settings(settings)
    assert info.value.field == field and str(info.value).startswith(field)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_is_refused_without_cuda() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(StartupError, match="model.device"):
        resolve_device("cuda:0")


def test_warm_up_sizes() -> None:
    assert warm_up_sizes(1) == [1]
    assert warm_up_sizes(8) == [1, 2, 4, 8]
    assert warm_up_sizes(12) == [1, 2, 4, 8, 12]


def test_out_of_memory_splits_the_batch_until_it_fits(served, monkeypatch) -> None:
    runner, model = served
    images = [BatchItem(x) for x in _images(8, runner)]
    expected = runner.run_batch(images)
    sizes: list[int] = []
    forward = model.forward

    def tight(x):
        sizes.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (pretend)")
        return forward(x)

    monkeypatch.setattr(model, "forward", tight)
    got = runner.run_batch(images)
    assert sizes == [8, 4, 2, 2, 4, 2, 2]
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)


def test_out_of_memory_for_one_image_is_an_error_of_its_own(served, monkeypatch) -> None:
    runner, model = served

    def full(x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (pretend)")

    monkeypatch.setattr(model, "forward", full)
    with pytest.raises(OutOfMemory, match="out of memory"):
        runner.run_batch([BatchItem(x) for x in _images(2, runner)])
