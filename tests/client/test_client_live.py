"""The client against a real cbam-serve serving the default model, over loopback."""

import threading
import time

import grpc
import numpy as np
import pytest
from PIL import Image
from real_server import free_port, requests_total, sample_labels

from client import AsyncClient, Client, InvalidArgumentError, RetryPolicy
from server.launcher import ServerProcess

LABELS = sample_labels()
FIRST = next(iter(LABELS))


def test_sync_classify_of_a_sample_gives_its_true_label(live):
    with Client(live.address) as client:
        prediction = client.classify(FIRST, top_k=3)
    assert prediction.top.name == LABELS[FIRST]
    assert len(prediction.labels) == 3
    assert (
        prediction.labels[0].probability
        >= prediction.labels[1].probability
        >= prediction.labels[2].probability
    )
    assert prediction.model_version and prediction.timings.batch_size >= 1


async def test_async_classify_of_bytes_pil_and_numpy_gives_the_true_label(live):
    path = list(LABELS)[5]
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    async with AsyncClient(live.address) as client:
        for image in (path.read_bytes(), rgb, np.asarray(rgb), np.asarray(rgb).transpose(2, 0, 1) / 255.0):
            assert (await client.classify(image, top_k=1)).top.name == LABELS[path]


def test_stream_of_all_samples_gives_every_true_label(live):
    with Client(live.address) as client:
        predictions = client.classify_many(list(LABELS), top_k=1, max_inflight=8)
    assert [p.top.name for p in predictions] == list(LABELS.values())


async def test_async_stream_of_all_samples(live):
    async with AsyncClient(live.address) as client:
        results = [r async for r in client.classify_stream(list(LABELS), top_k=1)]
    assert sorted(r.index for r in results) == list(range(len(LABELS)))
    paths = list(LABELS)
    assert all(r.prediction.top.name == LABELS[paths[r.index]] for r in results)


def test_attention_maps_decode_with_the_right_shapes_in_both_formats(live):
    with Client(live.address) as client:
        info = client.model_info()
        float16 = client.classify(FIRST, attention="both", attention_format="float16")
        png = client.classify(FIRST, attention="both", attention_format="png")
    assert list(float16.attention) == list(png.attention) == info.attention_blocks
    height, width = info.input_size
    for block, maps in float16.attention.items():
        spatial, channel = maps["spatial"], maps["channel"]
        assert spatial.dtype == channel.dtype == np.float32
        assert spatial.ndim == 2 and channel.ndim == 1
        assert height % spatial.shape[0] == 0 and width % spatial.shape[1] == 0  # a downsampled grid
        assert ((spatial >= 0) & (spatial <= 1)).all() and ((channel >= 0) & (channel <= 1)).all()
        assert png.attention[block]["spatial"].shape == spatial.shape
        assert png.attention[block]["channel"].shape == channel.shape
        assert np.abs(png.attention[block]["spatial"] - spatial).max() <= 1 / 255 + 1e-3  # 8-bit vs float16
    assert float16.attention[info.attention_blocks[0]]["spatial"].shape == (height, width)  # CIFAR-style stem


def test_attention_of_named_blocks_and_kinds_only(live):
    with Client(live.address) as client:
        block = client.model_info().attention_blocks[-1]
        prediction = client.classify(FIRST, attention="spatial", attention_blocks=[block])
    assert list(prediction.attention) == [block]
    assert list(prediction.attention[block]) == ["spatial"]


def test_invalid_argument_carries_code_and_message_and_is_not_retried(live):
    before = requests_total(live.metrics_url, "Classify", "INVALID_ARGUMENT")
    with Client(live.address, retry=RetryPolicy(max_attempts=5)) as client:
        with pytest.raises(InvalidArgumentError) as caught:
            client.classify(b"this is not an image")
        with pytest.raises(InvalidArgumentError) as too_many:
            client.classify(FIRST, top_k=11)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and caught.value.message
    assert "top_k" in too_many.value.message
    assert requests_total(live.metrics_url, "Classify", "INVALID_ARGUMENT") - before == 2  # one attempt each


def test_batch_of_all_samples_in_one_call_gives_every_true_label(live):
    calls = requests_total(live.metrics_url, "ClassifyBatch")
    with Client(live.address) as client:
        assert client.model_info().max_batch_items >= len(LABELS)
        predictions = client.classify_batch(list(LABELS), top_k=1)
    assert [p.top.name for p in predictions] == list(LABELS.values())
    assert requests_total(live.metrics_url, "ClassifyBatch") == calls + 1  # one call, not one per image


async def test_async_batch_mixes_inputs_and_a_bad_one_fails_alone(live, tmp_path):
    path = list(LABELS)[2]
    missing = tmp_path / "missing.png"
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    async with AsyncClient(live.address) as client:
        results = await client.classify_batch(
            [path, b"garbage", np.asarray(rgb), missing, rgb], top_k=1, return_exceptions=True
        )
        assert [type(r).__name__ for r in results[1::2]] == ["InvalidArgumentError"] * 2
        assert "input 3" in results[3].message  # unreadable here: never sent
        assert all(r.top.name == LABELS[path] for r in results[0::2])
        with pytest.raises(InvalidArgumentError, match="image.encoded"):
            await client.classify_batch([path, b"garbage"])


def test_bad_stream_items_fail_alone(live):
    with Client(live.address) as client:
        results = client.classify_many([FIRST, b"garbage", FIRST], return_exceptions=True)
    assert results[0].top.name == results[2].top.name == LABELS[FIRST]
    assert isinstance(results[1], InvalidArgumentError) and results[1].message


def test_model_info_and_health(live):
    with Client(live.address) as client:
        info = client.model_info()
        assert client.health() == "SERVING"
        assert client.health("cbam.v1.InferenceService") == "SERVING"
    assert info.labels == [str(d) for d in range(10)]
    assert info.input_size == (32, 32) and info.batching.max_batch_size >= 1


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_retries_on_unavailable_until_a_late_server_comes_up():
    port = free_port()
    # Budget enough retries for a server start on a slow, busy machine (a minute or more).
    retry = RetryPolicy(max_attempts=1000, initial_backoff_seconds=0.2, max_backoff_seconds=1.0, jitter=0.5)
    outcome = {}

    def call():
        with Client(f"127.0.0.1:{port}", retry=retry, timeout=600) as client:
            started = time.monotonic()
            try:
                outcome["label"] = client.classify(FIRST).top.name
            except Exception as exc:  # reported by the assertion below
                outcome["error"] = exc
            outcome["seconds"] = time.monotonic() - started

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    time.sleep(1.0)  # the first attempts meet a closed port
    with ServerProcess("--port", str(port)):
        caller.join(timeout=600)
    assert outcome.get("label") == LABELS[FIRST], outcome
    assert outcome["seconds"] > 1.0


def test_stream_in_lockstep_one_image_at_a_time(live):
    # A request read after the first answer once failed the whole stream (a server closure bug).
    with Client(live.address) as client:
        # each image goes out only after the answer to the one before
        predictions = client.classify_many([FIRST] * 3, max_inflight=1)
    assert [p.top.name for p in predictions] == [LABELS[FIRST]] * 3
