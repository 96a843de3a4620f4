"""Real tritonclient.grpc against a started cbam-serve. Run by test_oip_tritonclient.py in a process
of its own: tritonclient's generated modules and ours (cbam.oip) define the same `inference.*` protobuf
symbols, and protobuf refuses to load both into one process. So this module imports no server code and
no cbam.oip; cbam.v1 answers (through the client package) are its reference."""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from client import Client
from models import SAMPLES_DIR
from server.launcher import ServerProcess

MODEL = "cbam_resnet8_cifar"
LIMIT = 8  # --limits.max_batch_items


@pytest.fixture(scope="module")
def served() -> Iterator[ServerProcess]:
    args = ("--limits.max_batch_items", str(LIMIT), "--batching.max_batch_size", "16",
            "--batching.max_batch_delay_ms", "50")  # fmt: skip
    with ServerProcess(*args) as server:
        yield server


@pytest.fixture
def tc(served: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(served.address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def samples() -> list[tuple[bytes, np.ndarray, str]]:
    """The default model's sample digits: (PNG bytes, uint8 32 x 32 x 3 pixels, true label), eight of them."""
    labels = json.loads((SAMPLES_DIR / "labels.json").read_text())
    out = []
    for name, label in sorted(labels.items())[:LIMIT]:
        data = (SAMPLES_DIR / name).read_bytes()
        with Image.open(SAMPLES_DIR / name) as image:
            out.append((data, np.asarray(image.convert("RGB").resize((32, 32))), label))
    return out


def uint8_input(batch: np.ndarray, name: str = "images") -> triton.InferInput:
    tensor = triton.InferInput(name, list(batch.shape), "UINT8")
    return tensor.set_data_from_numpy(batch)


def bytes_input(files: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("encoded_images", [len(files), 1], "BYTES")
    return tensor.set_data_from_numpy(np.array([[f] for f in files], dtype=np.object_))


def classify_top(served: ServerProcess, images: list, k: int) -> list[list[tuple[int, float]]]:
    """cbam.v1 Classify of each image: its top k (index, probability)."""
    with Client(served.address) as client:
        return [[(s.index, s.probability) for s in client.classify(i, top_k=k).labels] for i in images]


def test_live_ready_and_server_metadata(tc) -> None:
    assert tc.is_server_live() and tc.is_server_ready()
    assert tc.is_model_ready(MODEL) and tc.is_model_ready(MODEL, "digits-1")
    metadata = tc.get_server_metadata(as_json=True)
    assert metadata["name"] == "cbam-serve" and "classification" in metadata["extensions"]


def test_repository_index(tc) -> None:
    index = tc.get_model_repository_index(as_json=True)
    assert index["models"] == [{"name": MODEL, "version": "digits-1", "state": "READY"}]


def test_model_metadata_and_config(tc) -> None:
    metadata = tc.get_model_metadata(MODEL, as_json=True)
    assert metadata["name"] == MODEL and metadata["versions"] == ["digits-1"]
    inputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in metadata["inputs"]}
    assert inputs["images"] == ("UINT8", [-1, 32, 32, 3]) and inputs["encoded_images"] == ("BYTES", [-1, 1])
    outputs = {t["name"]: [int(d) for d in t["shape"]] for t in metadata["outputs"]}
    assert outputs["probabilities"] == [-1, 10] and outputs["attention/layer2.0/spatial"] == [-1, 16, 16]
    config = tc.get_model_config(MODEL, as_json=True)["config"]
    assert config["max_batch_size"] == LIMIT
    assert config["dynamic_batching"]["preferred_batch_size"] == [16]
    assert [i["name"] for i in config["input"]] == ["images", "encoded_images", "normalized_images"]


def test_a_uint8_batch_has_cbam_v1s_top_1(tc, served, samples) -> None:
    batch = np.stack([pixels for _, pixels, _ in samples])
    result = tc.infer(MODEL, [uint8_input(batch)], request_id="batch-1")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (LIMIT, 10) and probabilities.dtype == np.float32
    assert result.get_response().id == "batch-1"
    want = classify_top(served, list(batch), 1)
    assert list(probabilities.argmax(axis=1)) == [top[0][0] for top in want]
    np.testing.assert_allclose(probabilities.max(axis=1), [top[0][1] for top in want], atol=1e-5)
    labels = [label for _, _, label in samples]
    assert [str(i) for i in probabilities.argmax(axis=1)] == labels  # and the digits are right


def test_a_bytes_batch_is_decoded_as_cbam_v1_decodes(tc, served, samples) -> None:
    files = [data for data, _, _ in samples]
    result = tc.infer(MODEL, [bytes_input(files)])
    probabilities = result.as_numpy("probabilities")
    want = classify_top(served, files, 1)
    assert list(probabilities.argmax(axis=1)) == [top[0][0] for top in want]


def test_class_count_answers_tritons_top_k_strings(tc, served, samples) -> None:
    batch = np.stack([pixels for _, pixels, _ in samples[:3]])
    outputs = [triton.InferRequestedOutput("probabilities", class_count=5)]
    top = tc.infer(MODEL, [uint8_input(batch)], outputs=outputs).as_numpy("probabilities")
    assert top.shape == (3, 5)
    want = classify_top(served, list(batch), 5)
    for row, expected in zip(top, want, strict=True):
        parts = [element.decode().split(":") for element in row]
        assert [int(index) for _, index, _ in parts] == [index for index, _ in expected]
        assert [label for _, index, label in parts] == [index for _, index, _ in parts]  # labels "0".."9"
        np.testing.assert_allclose(
            [float(score) for score, _, _ in parts], [p for _, p in expected], atol=2e-6
        )


def test_an_attention_output(tc, samples) -> None:
    batch = np.stack([pixels for _, pixels, _ in samples[:2]])
    outputs = [
        triton.InferRequestedOutput("attention/layer1.0/spatial"),
        triton.InferRequestedOutput("probabilities"),
    ]
    result = tc.infer(MODEL, [uint8_input(batch)], outputs=outputs)
    spatial = result.as_numpy("attention/layer1.0/spatial")
    assert spatial.shape == (2, 32, 32) and spatial.dtype == np.float32
    assert spatial.min() >= 0 and spatial.max() <= 1  # sigmoid gates
    half = tc.infer(
        MODEL, [uint8_input(batch)], outputs=outputs[:1], parameters={"attention_datatype": "FP16"}
    )
    assert half.as_numpy("attention/layer1.0/spatial").dtype == np.float16
    np.testing.assert_allclose(half.as_numpy("attention/layer1.0/spatial"), spatial, atol=1e-3)


def test_statistics_grow(tc, samples) -> None:
    def stats() -> dict:
        (model,) = tc.get_inference_statistics(MODEL, as_json=True)["model_stats"]
        return model

    before = stats()
    batch = np.stack([pixels for _, pixels, _ in samples[:4]])
    tc.infer(MODEL, [uint8_input(batch)])
    after = stats()
    assert int(after["inference_count"]) == int(before.get("inference_count", 0)) + 4
    assert int(after["execution_count"]) > int(before.get("execution_count", 0))
    success = [int(s["inference_stats"]["success"].get("count", 0)) for s in (before, after)]
    assert success[1] == success[0] + 1
    for field in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert int(after["inference_stats"][field]["ns"]) > int(
            before["inference_stats"].get(field, {}).get("ns", 0)
        )


def test_a_stream_answers_every_request(tc, samples) -> None:
    answers: queue.Queue = queue.Queue()
    tc.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(3):
            batch = np.stack([pixels for _, pixels, _ in samples[i : i + 2]])
            tc.async_stream_infer(MODEL, [uint8_input(batch)], request_id=f"s{i}")
        got = [answers.get(timeout=60) for _ in range(3)]
    finally:
        tc.stop_stream()
    assert all(error is None for _, error in got), got
    assert sorted(result.get_response().id for result, _ in got) == ["s0", "s1", "s2"]
    assert all(result.as_numpy("probabilities").shape == (2, 10) for result, _ in got)


def _bad_requests(samples) -> list[tuple[str, dict, str, str]]:
    one = np.stack([samples[0][1]])
    floats = triton.InferInput("images", [1, 32, 32, 3], "FP32").set_data_from_numpy(one.astype(np.float32))
    small = uint8_input(np.zeros((1, 16, 32, 3), np.uint8))
    short = uint8_input(one).set_shape([2, 32, 32, 3])  # the bytes of one image, the shape of two
    too_many = uint8_input(np.repeat(one, LIMIT + 1, axis=0))
    invalid = "StatusCode.INVALID_ARGUMENT"
    return [
        ("wrong datatype", {"inputs": [floats]}, invalid, "input 'images': datatype 'FP32'"),
        ("wrong shape", {"inputs": [small]}, invalid, "input 'images': shape [1, 16, 32, 3]"),
        ("byte count", {"inputs": [short]}, invalid, "input 'images': 3072 bytes in raw_input_contents"),
        (
            "N over the limit",
            {"inputs": [too_many]},
            invalid,
            f"input 'images': {LIMIT + 1} images, at most {LIMIT}",
        ),
        (
            "undecodable bytes",
            {"inputs": [bytes_input([samples[0][0], b"\x89PNG broken"])]},
            invalid,
            "input 'encoded_images' element 1",
        ),  # fmt: skip
        (
            "unknown output",
            {"inputs": [uint8_input(one)], "outputs": [triton.InferRequestedOutput("logits")]},
            invalid,
            "output 'logits'",
        ),  # fmt: skip
        (
            "unknown parameter",
            {"inputs": [uint8_input(one)], "parameters": {"temperature": 0.5}},
            invalid,
            "parameter 'temperature'",
        ),  # fmt: skip
        (
            "unknown model",
            {"inputs": [uint8_input(one)], "model_name": "resnet50"},
            "StatusCode.NOT_FOUND",
            "model 'resnet50' is not served here",
        ),  # fmt: skip
    ]


def test_every_bad_input_fails_alone_naming_what_is_wrong(tc, served, samples) -> None:
    """Sent at once, with good requests that share their batches: each bad one gets its status and a
    message naming the tensor; every good one is answered."""
    cases = _bad_requests(samples)
    done: queue.Queue = queue.Queue()
    batch = np.stack([pixels for _, pixels, _ in samples[:2]])
    for i in range(4):
        tc.async_infer(
            MODEL, [uint8_input(batch)], lambda result, error, i=i: done.put((f"good {i}", result, error))
        )
    for name, call, _, _ in cases:
        kwargs = {"model_name": MODEL, **call}
        tc.async_infer(callback=lambda result, error, name=name: done.put((name, result, error)), **kwargs)
    outcomes = {}
    for _ in range(4 + len(cases)):
        name, result, error = done.get(timeout=60)
        outcomes[name] = (result, error)
    for i in range(4):
        result, error = outcomes[f"good {i}"]
        assert error is None and result.as_numpy("probabilities").shape == (2, 10), error
    for name, _, status, message in cases:
        result, error = outcomes[name]
        assert isinstance(error, InferenceServerException), (name, result)
        assert error.status() == status, (name, error.status(), error.message())
        assert message in error.message(), (name, error.message())
