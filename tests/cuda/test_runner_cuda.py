"""The runner's CUDA paths on a real GPU: float16 and bfloat16, uint8 pixels through the pinned staging
buffer normalised on the device, compiled buckets replayed as CUDA graphs, and a batch split when the
device runs out of memory.

Marked cuda: skipped where no CUDA device is usable, failed there under --require-cuda (as
scripts/gpu_check.sh runs them). The reference is float32 on the CPU.
"""

from __future__ import annotations

import logging

import pytest
import torch

from server.assembly import BatchAssembler
from server.config import ModelSettings
from server.errors import OutOfMemory
from server.preprocess import ImageSpec, load_pixels
from server.runner import BatchItem, ModelRunner

pytestmark = pytest.mark.cuda

# ‖out − ref‖ / ‖ref‖ per image against float32 on the CPU. float32 on CUDA may run its convolutions
# in TF32 (near 3e-4); float16 and bfloat16 operands land between 1e-3 and 1e-2 (4.5e-3 measured for
# cbam_resnet50 in bfloat16 on the CPU).
RELATIVE_ERROR = {"float32": 3e-3, "float16": 1e-2, "bfloat16": 3e-2}


def _runner(device: str, max_batch_size: int = 32, **settings) -> ModelRunner:
    settings.setdefault("backend", "eager")  # the reference, unless a test asks for another
    return ModelRunner.from_settings(ModelSettings(device=device, **settings), max_batch_size=max_batch_size)


@pytest.fixture(scope="module")
def cpu() -> ModelRunner:
    return _runner("cpu")


def _pixels(n: int, runner: ModelRunner, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (n, *runner.description.input_size, 3)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)


def _logits(runner: ModelRunner, items: list[BatchItem]) -> torch.Tensor:
    return torch.stack([out.logits for out in runner.run_batch(items)])


def _worst_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest per-image ‖got − want‖ / ‖want‖ (one wrong image is not averaged away)."""
    assert torch.isfinite(got).all(), "non-finite logits"
    got, want = got.double(), want.double()
    return ((got - want).norm(dim=1) / want.norm(dim=1)).max().item()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_each_dtype_classifies_the_samples_as_float32_on_the_cpu(cpu, samples, dtype) -> None:
    gpu = _runner("cuda", dtype=dtype)
    gpu.warm_up([1, 32])
    assert gpu.device.type == "cuda" and gpu.description.dtype == dtype
    d = gpu.description
    spec = ImageSpec(d.input_size, d.mean, d.std, 10_000_000)
    items = [BatchItem(load_pixels(image, spec)) for image, _ in samples]
    got, want = _logits(gpu, items), _logits(cpu, items)
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    assert _worst_error(got, want) < RELATIVE_ERROR[dtype]
    top2 = want.topk(2, dim=1).values
    confident = top2[:, 0] - top2[:, 1] > 1.0  # where float32 itself is unsure, rounding may flip it
    assert confident.any() and torch.equal(got.argmax(1)[confident], want.argmax(1)[confident])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cbam_resnet50_in_half_precision_stays_near_float32(dtype) -> None:
    reference = _runner("cpu", max_batch_size=4, arch="cbam_resnet50")
    half = _runner("cuda", max_batch_size=4, arch="cbam_resnet50", dtype=dtype)
    items = [BatchItem(p) for p in _pixels(4, half)]
    assert _worst_error(_logits(half, items), _logits(reference, items)) < RELATIVE_ERROR[dtype]


def test_uint8_pixels_are_normalised_on_the_device_as_on_the_host(cpu) -> None:
    d = cpu.description
    # As each runner makes its own: on CUDA, staged through pinned memory and normalised on the device.
    gpu, host = (
        BatchAssembler(d.input_size, d.mean, d.std, device=torch.device(name)) for name in ("cuda", "cpu")
    )
    pixels = _pixels(8, cpu)
    ready = host.assemble([pixels[7]])[0].clone()  # a normalised float32 3 x H x W tensor
    batches = {
        "one image": [pixels[0]],
        "a whole uint8 batch": list(pixels),
        "pixels and a ready tensor": [pixels[0], ready, pixels[1]],
    }
    for name, images in batches.items():
        with torch.inference_mode():
            on_device = gpu.assemble(images)
            assert on_device.device.type == "cuda", name
            on_device = on_device.cpu()
            on_host = host.assemble(images).clone()
        torch.testing.assert_close(on_device, on_host, rtol=0, atol=1e-5, msg=name)


def test_batches_back_to_back_never_mix_their_pixels(cpu) -> None:
    # Every batch reuses the pinned staging buffer and the device batch; a copy still in flight when
    # the next batch is staged would hand some image another image's pixels.
    gpu = _runner("cuda")
    for seed, n in enumerate([32, 3, 32, 1, 17, 32, 2, 32]):
        items = [BatchItem(p) for p in _pixels(n, gpu, seed)]
        assert _worst_error(_logits(gpu, items), _logits(cpu, items)) < RELATIVE_ERROR["float32"], seed


# Inductor suggests TF32 for float32 matrix products on Ampere and later: advice, not a fault.
@pytest.mark.filterwarnings("ignore:TensorFloat32 tensor cores:UserWarning")
def test_compiled_buckets_replay_as_cuda_graphs_with_eager_answers() -> None:
    compiled = _runner("cuda", max_batch_size=4, backend="compile")
    compiled.warm_up([1, 2, 4])  # compiles and captures buckets 1, 2, 4 (checked against eager when built)
    eager = _runner("cuda", max_batch_size=4)
    assert compiled.description.backend == "compile"
    for seed, n in enumerate([3, 4, 1, 3]):  # 3 is padded to bucket 4; replays get fresh pixels
        items = [BatchItem(p) for p in _pixels(n, compiled, seed)]
        assert _worst_error(_logits(compiled, items), _logits(eager, items)) < RELATIVE_ERROR["float32"]
    blocks = frozenset(compiled.description.attention_blocks)
    item = BatchItem(_pixels(1, compiled, seed=9)[0], blocks)  # maps run the eager module
    (with_maps,), (want,) = compiled.run_batch([item]), eager.run_batch([item])
    assert with_maps.maps.keys() == want.maps.keys() == blocks
    for block, kinds in want.maps.items():
        for kind, values in kinds.items():
            if values is not None:
                torch.testing.assert_close(with_maps.maps[block][kind], values, rtol=1e-3, atol=1e-3)


def test_a_batch_too_large_for_the_memory_left_is_split_and_answered(caplog) -> None:
    runner = _runner("cuda", max_batch_size=32, arch="cbam_resnet50")
    device = runner.device
    items = [BatchItem(p) for p in _pixels(32, runner)]
    want = torch.cat([_logits(runner, items[i : i + 2]) for i in range(0, 32, 2)])

    # What a forward needs: a fixed part and a part per image, from the peaks of batches of 1 and 2.
    peaks = []
    for n in (1, 2):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        _logits(runner, items[:n])
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    per_image = peaks[1] - peaks[0]
    assert per_image > 0, peaks
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.empty_cache()
    room = torch.cuda.memory_reserved(device) + peaks[0] + 4.5 * per_image  # about 4 images, not 32
    try:
        torch.cuda.set_per_process_memory_fraction(room / total, device)
        with caplog.at_level(logging.WARNING, logger="server.runner"):
            got = _logits(runner, items)
        torch.cuda.empty_cache()
        # No room at all beyond what is held: one image alone cannot run, and says so.
        torch.cuda.set_per_process_memory_fraction(torch.cuda.memory_allocated(device) / total, device)
        with pytest.raises(OutOfMemory, match="single image"):
            runner.run_batch(items[:1])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    assert any("splitting the batch" in record.getMessage() for record in caplog.records)
    assert _worst_error(got, want) < RELATIVE_ERROR["float32"]
    assert _worst_error(_logits(runner, items[:2]), want[:2]) < RELATIVE_ERROR["float32"]  # serves on
