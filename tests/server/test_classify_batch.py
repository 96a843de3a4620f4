"""ClassifyBatch over a real loopback socket: answers in order that equal one call per image, a bad item
fails alone, whole-call limits as statuses, all-or-nothing queueing, deadlines, metrics."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from cbam.v1 import inference_pb2 as pb
from tests.server.conftest import png, sample
from tests.support import eventually

INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


def pixels(seed: int) -> pb.Tensor:
    data = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8).tobytes()
    return pb.Tensor(dtype=pb.Tensor.DTYPE_UINT8, shape=[32, 32, 3], data=data)


async def test_answers_come_in_order_and_equal_one_call_per_image(make_server, connect) -> None:
    server = await make_server("--batching.max_batch_size", "4")
    stub = connect(server)
    items = [pb.ClassifyRequest(request_id=f"t{i}", tensor=pixels(i), top_k=3) for i in range(7)]
    items += [pb.ClassifyRequest(request_id="png", encoded=png(3), top_k=2)]
    items += [pb.ClassifyRequest(tensor=pixels(8))]  # no id: one is made up
    response = await stub.ClassifyBatch(pb.ClassifyBatchRequest(items=items))
    assert [r.request_id for r in response.results[:8]] == [*(f"t{i}" for i in range(7)), "png"]
    assert len(response.results[8].request_id) == 32
    assert all(r.WhichOneof("outcome") == "response" for r in response.results)
    # Batches hold at most max_batch_size images, however many the call carries.
    assert {r.response.timings.batch_size for r in response.results} <= {1, 2, 3, 4}
    assert max(r.response.timings.batch_size for r in response.results) > 1
    for item, result in zip(items, response.results, strict=True):
        alone = await stub.Classify(item)
        assert [label.index for label in result.response.labels] == [label.index for label in alone.labels]
        got = [label.probability for label in result.response.labels]
        assert got == pytest.approx([label.probability for label in alone.labels], abs=1e-5)
    assert sample(server, "cbam_requests_total", method="ClassifyBatch", code="OK") == 1
    assert sample(server, "cbam_images_total", method="ClassifyBatch", code="OK") == 9


async def test_a_bad_item_fails_alone(make_server, connect) -> None:
    server = await make_server()
    stub = connect(server)
    spatial = pb.AttentionRequest(kind=pb.ATTENTION_KIND_SPATIAL, blocks=["layer1.0"])
    items = [
        pb.ClassifyRequest(request_id="good", tensor=pixels(0)),
        pb.ClassifyRequest(request_id="corrupt", encoded=b"not an image"),
        pb.ClassifyRequest(request_id="top_k", tensor=pixels(1), top_k=99),
        pb.ClassifyRequest(request_id="no image"),
        pb.ClassifyRequest(request_id="kind", tensor=pixels(2), attention=pb.AttentionRequest(kind=9)),
        pb.ClassifyRequest(request_id="short", tensor=pb.Tensor(dtype=1, shape=[32, 32, 3], data=bytes(5))),
        pb.ClassifyRequest(request_id="maps", tensor=pixels(3), attention=spatial),
    ]
    response = await stub.ClassifyBatch(pb.ClassifyBatchRequest(items=items))
    by_id = {r.request_id: r for r in response.results}
    assert [r.request_id for r in response.results] == [item.request_id for item in items]
    for name, message in [
        ("corrupt", "image.encoded"),
        ("top_k", "top_k"),
        ("no image", "empty request"),
        ("kind", "attention.kind"),
        ("short", "image.tensor.data"),
    ]:
        assert by_id[name].error.code == INVALID.value[0], name
        assert message in by_id[name].error.message, (name, by_id[name].error.message)
    assert by_id["good"].response.labels and not by_id["good"].response.attention
    maps = by_id["maps"].response.attention
    assert [(m.block, m.kind) for m in maps] == [("layer1.0", pb.ATTENTION_KIND_SPATIAL)]
    assert sample(server, "cbam_images_total", method="ClassifyBatch", code="OK") == 2
    assert sample(server, "cbam_images_total", method="ClassifyBatch", code="INVALID_ARGUMENT") == 5
    assert sample(server, "cbam_requests_total", method="ClassifyBatch", code="INTERNAL") == 0


@pytest.mark.parametrize(
    ("count", "message"), [(0, "items: empty"), (5, "at most 4 in one call (limits.max_batch_items)")]
)
async def test_no_items_or_too_many_is_invalid(make_server, connect, count: int, message: str) -> None:
    server = await make_server("--limits.max_batch_items", "4")
    info = await connect(server).GetModelInfo(pb.GetModelInfoRequest())
    assert info.max_batch_items == 4
    items = [pb.ClassifyRequest(tensor=pixels(i)) for i in range(count)]
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await connect(server).ClassifyBatch(pb.ClassifyBatchRequest(items=items))
    assert error.value.code() == INVALID and message in error.value.details()
    assert sample(server, "cbam_images_total", method="ClassifyBatch", code="INVALID_ARGUMENT") == count


async def test_a_batch_the_queue_cannot_hold_is_refused_whole(make_server, connect, gate) -> None:
    server = await make_server(
        "--batching.max_batch_size", "1", "--batching.max_queue", "3", "--batching.max_batch_delay_ms", "0"
    )
    stub = connect(server)
    computing = await gate.hold(stub.Classify(pb.ClassifyRequest(tensor=pixels(0))))
    queued = asyncio.ensure_future(stub.Classify(pb.ClassifyRequest(tensor=pixels(1))))
    await eventually(lambda: server.pipeline.batcher.depth == 1)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        items = [pb.ClassifyRequest(tensor=pixels(i)) for i in range(3)]
        await stub.ClassifyBatch(pb.ClassifyBatchRequest(items=items))
    assert error.value.code() == EXHAUSTED
    assert (
        "room for 2 of these 3 images" in error.value.details() and "none was queued" in error.value.details()
    )
    assert server.pipeline.batcher.depth == 1  # nothing of the refused call was taken
    fits = asyncio.ensure_future(
        stub.ClassifyBatch(
            pb.ClassifyBatchRequest(items=[pb.ClassifyRequest(tensor=pixels(i)) for i in (5, 6)])
        )
    )
    await eventually(lambda: server.pipeline.batcher.depth == 3)
    gate.release()
    answered = await fits
    assert all(r.response.labels for r in answered.results)
    assert (await computing).labels and (await queued).labels
    assert sample(server, "cbam_dropped_requests_total", reason="overloaded") == 3
    assert sample(server, "cbam_images_total", method="ClassifyBatch", code="RESOURCE_EXHAUSTED") == 3


async def test_deadline_in_the_queue_is_deadline_exceeded_and_not_computed(
    make_server, connect, gate
) -> None:
    server = await make_server("--batching.max_batch_size", "1", "--batching.max_batch_delay_ms", "0")
    stub = connect(server)
    first = await gate.hold(stub.Classify(pb.ClassifyRequest(tensor=pixels(0))))
    items = [pb.ClassifyRequest(tensor=pixels(i)) for i in range(3)]
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.ClassifyBatch(pb.ClassifyBatchRequest(items=items), timeout=0.3)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    gate.release()
    await first
    await eventually(lambda: server.pipeline.batcher.depth == 0)
    # Batches run in order: once a later call is answered, anything of the batch that was going to be
    # computed has been.
    assert (await stub.Classify(pb.ClassifyRequest(tensor=pixels(9)))).labels
    assert gate.computed == [1, 1]  # the first call and the later one: none of the batch's images
    await eventually(
        lambda: sample(server, "cbam_requests_total", method="ClassifyBatch", code="DEADLINE_EXCEEDED") == 1
    )


async def test_a_batch_taken_before_the_drain_is_answered_whole(make_server, connect, gate) -> None:
    server = await make_server("--batching.max_batch_size", "2", "--batching.max_batch_delay_ms", "0")
    stub = connect(server)
    items = [pb.ClassifyRequest(tensor=pixels(i)) for i in range(5)]
    taken = await gate.hold(stub.ClassifyBatch(pb.ClassifyBatchRequest(items=items)))
    stopping = asyncio.ensure_future(server.stop(10))
    await eventually(lambda: server.calls.draining)
    gate.release()
    answered = await taken
    assert [bool(r.response.labels) for r in answered.results] == [True] * 5  # nothing taken is lost
    await stopping
    assert sum(gate.computed) == 5


async def test_a_draining_server_refuses_a_batch_as_unavailable(make_server, connect) -> None:
    server = await make_server()
    server.calls.refuse_new_work()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await connect(server).ClassifyBatch(
            pb.ClassifyBatchRequest(items=[pb.ClassifyRequest(tensor=pixels(0))])
        )
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
