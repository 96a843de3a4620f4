"""Faults inside the model: a failed forward is run once more, so a passing fault costs no answer and
one that stays fails only its batch; CUDA out-of-memory splits the batch.

The faults are injected on the CPU by serving the model through a `FaultyModel` wrapper: a runner built
with an eager backend around it (`ModelRunner(..., backend=EagerBackend(model))`) is handed to
`build_server(settings, runner=...)`: a seam for tests, not a setting anyone can turn on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
from collections.abc import Callable

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from cbam.v1 import inference_pb2 as pb
from cbam.v1 import inference_pb2_grpc
from server.app import build_server
from server.backends.eager import EagerBackend
from server.config import load_settings
from server.loading import load_model
from server.runner import ModelRunner
from tests.reliability import corpus

pytestmark = pytest.mark.timeout(300)

BATCH = 8


class FaultyModel(nn.Module):
    """The served model, with faults on demand: ``fail_next(exc)``, ``fail_always(exc)``,
    ``fail_with_uniform_images(exc)`` or ``oom_above(size)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model
        self.attention_blocks = model.attention_blocks
        self.batch_sizes: list[int] = []
        self._next: collections.deque[BaseException] = collections.deque()
        self._always: BaseException | None = None
        self._uniform: BaseException | None = None
        self._oom_above: int | None = None

    def fail_next(self, exc: BaseException) -> None:
        self._next.append(exc)

    def fail_always(self, exc: BaseException | None) -> None:
        """Raise ``exc`` from every forward (None: stop)."""
        self._always = exc

    def fail_with_uniform_images(self, exc: BaseException | None) -> None:
        """Raise ``exc`` from every forward whose batch holds an image of one colour (None: stop)."""
        self._uniform = exc

    def oom_above(self, size: int | None) -> None:
        """Raise torch.cuda.OutOfMemoryError for every batch larger than ``size`` (None: never)."""
        self._oom_above = size

    def _check(self, x: torch.Tensor) -> None:
        self.batch_sizes.append(x.shape[0])
        if self._next:
            raise self._next.popleft()
        if self._always is not None:
            raise self._always
        pixels = x.flatten(2)
        if self._uniform is not None and (pixels.amax(2) == pixels.amin(2)).all(1).any():
            raise self._uniform
        if self._oom_above is not None and x.shape[0] > self._oom_above:
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {x.shape[0] * 512} MiB (injected by the test)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self.inner(x)

    def forward_with_attention(self, x: torch.Tensor, blocks=None):
        self._check(x)
        return self.inner.forward_with_attention(x, blocks=blocks)


@contextlib.asynccontextmanager
async def _faulty_server(*more_args: str):
    """(model, stub, server): an in-process server over a FaultyModel, where BATCH concurrent requests
    form one batch (the batch delay is generous)."""
    settings = load_settings([
        "--host", "127.0.0.1", "--port", "0", "--metrics.enabled", "false",
        "--batching.max_batch_size", str(BATCH), "--batching.max_batch_delay_ms", "10000", *more_args,
    ])  # fmt: skip
    served, meta = load_model(settings.model)
    model = FaultyModel(served)
    runner = ModelRunner(served, meta, backend=EagerBackend(model), max_batch_size=BATCH)
    server, port = build_server(settings, runner=runner)
    await server.start()
    model.batch_sizes.clear()  # warm-up's
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield model, inference_pb2_grpc.InferenceServiceStub(channel), server
    finally:
        await channel.close()
        await server.stop(0)


@pytest.fixture
async def faulty():
    async with _faulty_server() as served:
        yield served


IMAGES = [corpus.encode(corpus.picture(24, 24, seed=s)) for s in range(BATCH)]
UNIFORM = corpus.encode(np.full((24, 24, 3), 128, np.uint8))


async def _one_batch(stub, make: Callable[[int], pb.ClassifyRequest] | None = None) -> list:
    """BATCH concurrent requests (one batch); each outcome is a ClassifyResponse or an AioRpcError."""
    make = make or (lambda i: pb.ClassifyRequest(request_id=f"r{i}", encoded=IMAGES[i], top_k=10))
    calls = [stub.Classify(make(i), timeout=30) for i in range(BATCH)]
    return await asyncio.gather(*calls, return_exceptions=True)


def _probabilities(response: pb.ClassifyResponse) -> np.ndarray:
    out = np.zeros(10)
    for label in response.labels:
        out[label.index] = label.probability
    return out


def _internal(registry) -> float:
    return registry.get_sample_value("cbam_requests_total", {"method": "Classify", "code": "INTERNAL"}) or 0.0


async def test_a_passing_model_fault_costs_a_second_forward_not_an_answer(faulty):
    model, stub, server = faulty
    expected = [_probabilities(r) for r in await _one_batch(stub)]
    model.batch_sizes.clear()
    model.fail_next(RuntimeError("kernel exploded once"))
    got = await _one_batch(stub)
    assert model.batch_sizes == [BATCH, BATCH], "not one batch, then the same batch again"
    assert all(isinstance(r, pb.ClassifyResponse) for r in got), [r for r in got if isinstance(r, Exception)]
    for want, response in zip(expected, got, strict=True):
        np.testing.assert_allclose(_probabilities(response), want, atol=1e-5)
    assert _internal(server.metrics.registry) == 0


async def test_a_model_that_always_fails_answers_internal_then_recovers(faulty):
    model, stub, server = faulty
    model.fail_always(RuntimeError("kernel exploded: secret internal detail"))
    failed = await _one_batch(stub)
    model.fail_always(None)
    for outcome in failed:
        assert isinstance(outcome, grpc.aio.AioRpcError)
        assert outcome.code() is grpc.StatusCode.INTERNAL
        assert outcome.details() and "secret internal detail" not in outcome.details()
    assert _internal(server.metrics.registry) == BATCH
    ok = await _one_batch(stub)
    assert all(isinstance(o, pb.ClassifyResponse) and o.labels for o in ok)


async def test_a_model_fault_that_stays_fails_only_its_own_batch_of_stream_items(faulty):
    model, stub, _ = faulty
    model.fail_with_uniform_images(ValueError("bad weights for this one"))
    images = [UNIFORM if i == 5 else IMAGES[i % BATCH] for i in range(2 * BATCH)]
    requests = [pb.ClassifyRequest(request_id=f"s{i}", encoded=image) for i, image in enumerate(images)]
    answers = [a async for a in stub.ClassifyStream(iter(requests), timeout=30)]
    model.fail_with_uniform_images(None)
    failed = [a for a in answers if a.WhichOneof("outcome") == "error"]
    assert len(answers) == 2 * BATCH
    assert len(failed) == BATCH and "s5" in {a.request_id for a in failed}, (
        failed
    )  # the other batch went through
    for answer in failed:
        assert answer.error.code == grpc.StatusCode.INTERNAL.value[0] and answer.error.message


async def test_the_debug_setting_makes_sigusr1_fail_the_next_forward_once():
    """debug.fail_batch_on_sigusr1, as scripts/faults.py uses it: SIGUSR1 makes the next forward raise
    (before the model runs), the batch is run once more, and every request is answered."""
    async with _faulty_server("--debug.fail_batch_on_sigusr1", "true") as (model, stub, _):
        os.kill(os.getpid(), signal.SIGUSR1)
        await asyncio.sleep(0)  # the loop runs the handler
        outcomes = await _one_batch(stub)
        again = await _one_batch(stub)
    assert all(isinstance(o, pb.ClassifyResponse) for o in outcomes + again)
    # The injected fault raised before the model ran: it saw the batch once, then the next batch.
    assert model.batch_sizes == [BATCH, BATCH], model.batch_sizes


async def test_out_of_memory_splits_the_batch_until_it_fits_and_every_answer_is_right(faulty):
    model, stub, _ = faulty
    expected = [_probabilities(r) for r in await _one_batch(stub)]
    model.batch_sizes.clear()
    model.oom_above(2)
    got = await _one_batch(stub)
    assert all(isinstance(r, pb.ClassifyResponse) for r in got), [r for r in got if isinstance(r, Exception)]
    for want, response in zip(expected, got, strict=True):
        np.testing.assert_allclose(_probabilities(response), want, atol=1e-5)
    # 8 fails, both halves of 4 fail, then four batches of 2 fit
    assert model.batch_sizes == [8, 4, 2, 2, 4, 2, 2], model.batch_sizes
    model.oom_above(None)


async def test_out_of_memory_with_attention_keeps_each_requests_own_maps(faulty):
    model, stub, _ = faulty
    info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    blocks = list(info.attention_blocks)

    def make(i: int) -> pb.ClassifyRequest:
        request = pb.ClassifyRequest(request_id=f"a{i}", encoded=IMAGES[i])
        if i % 2:
            request.attention.kind = pb.ATTENTION_KIND_SPATIAL
            request.attention.blocks.append(blocks[i % len(blocks)])
        return request

    expected = await _one_batch(stub, make)
    model.oom_above(1)
    got = await _one_batch(stub, make)
    model.oom_above(None)
    for want, response in zip(expected, got, strict=True):
        assert [(m.block, m.kind) for m in response.attention] == [(m.block, m.kind) for m in want.attention]
        assert len(response.attention) == (1 if response.request_id[1:] in ("1", "3", "5", "7") else 0)
        for a, b in zip(response.attention, want.attention, strict=True):
            np.testing.assert_allclose(np.frombuffer(a.data, "<f2"), np.frombuffer(b.data, "<f2"), atol=1e-3)


async def test_out_of_memory_for_a_single_image_is_resource_exhausted_and_the_server_recovers(faulty):
    model, stub, _ = faulty
    model.oom_above(0)
    outcomes = await _one_batch(stub)
    for outcome in outcomes:
        assert isinstance(outcome, grpc.aio.AioRpcError)
        assert outcome.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "memory" in outcome.details()
    model.oom_above(None)
    assert all(isinstance(o, pb.ClassifyResponse) for o in await _one_batch(stub))


async def test_out_of_memory_splits_one_models_infer_batch_and_its_rows_stay_in_order(faulty):
    """A ModelInfer's images are one item in the batcher: out of memory halves it until it fits."""
    from cbam.oip import grpc_service_pb2 as oip_pb
    from cbam.oip import grpc_service_pb2_grpc

    model, _, server = faulty
    pixels = np.random.default_rng(5).integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8)
    request = oip_pb.ModelInferRequest(model_name=server.pipeline.description.arch)
    request.inputs.add(name="images", datatype="UINT8", shape=list(pixels.shape))
    request.raw_input_contents.append(pixels.tobytes())
    request.outputs.add(name="probabilities")
    request.outputs.add(name="attention/layer1.0/spatial")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        expected = await stub.ModelInfer(request, timeout=30)
        model.batch_sizes.clear()
        model.oom_above(2)
        got = await stub.ModelInfer(request, timeout=30)
        model.oom_above(None)
    assert model.batch_sizes == [8, 4, 2, 2, 4, 2, 2], model.batch_sizes
    for index in (0, 1):  # probabilities, then the maps
        want = np.frombuffer(expected.raw_output_contents[index], "<f4")
        np.testing.assert_allclose(np.frombuffer(got.raw_output_contents[index], "<f4"), want, atol=1e-5)
