"""Property-based tests over the request fields, against a real server.

Hypothesis draws every field of a ClassifyRequest (request_id, top_k, attention kind, format and
blocks, and an image that is good, broken, too large or missing), including values no client should
send. An oracle says whether the request is valid; a valid one must get a well-formed answer that
matches what it asked for, an invalid one a clear INVALID_ARGUMENT or RESOURCE_EXHAUSTED naming a
field. Nothing else (INTERNAL, UNKNOWN, a hang) is ever acceptable.
"""

from __future__ import annotations

import re

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cbam.v1 import inference_pb2 as pb
from tests.reliability import corpus
from tests.reliability.probes import check_response, health_status, model_info, stub_for

pytestmark = pytest.mark.timeout(120)

INT32 = st.integers(-(2**31), 2**31 - 1)
FIELDS = ("request_id", "top_k", "attention.", "image")


def _images(max_pixels: int) -> dict[str, tuple[pb.ClassifyRequest, grpc.StatusCode]]:
    """The image part of a request: (a request carrying only it, the code it alone deserves)."""
    hwc = corpus.picture(12, 9, seed=3)
    side = int(max_pixels**0.5) + 1
    u8, f32 = pb.Tensor.DTYPE_UINT8, pb.Tensor.DTYPE_FLOAT32
    ok, invalid = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT
    big = grpc.StatusCode.RESOURCE_EXHAUSTED
    return {
        "png": (pb.ClassifyRequest(encoded=corpus.encode(hwc)), ok),
        "jpeg": (pb.ClassifyRequest(encoded=corpus.encode(hwc, "JPEG")), ok),
        "uint8": (pb.ClassifyRequest(tensor=pb.Tensor(dtype=u8, shape=[9, 12, 3], data=hwc.tobytes())),
                  ok),
        "float32": (pb.ClassifyRequest(tensor=pb.Tensor(
            dtype=f32, shape=[3, 9, 12], data=(hwc.transpose(2, 0, 1) / 255).astype("<f4").tobytes())), ok),
        "broken": (pb.ClassifyRequest(encoded=b"\x89PNG\r\n\x1a\n" + bytes(40)), invalid),
        "bad-shape": (pb.ClassifyRequest(tensor=pb.Tensor(dtype=u8, shape=[9, 12, 2], data=hwc.tobytes())),
                      invalid),
        "too-large": (pb.ClassifyRequest(encoded=corpus.raw_png(side, side, 8, 0, [b"\x00"])), big),
        "none": (pb.ClassifyRequest(), invalid),
    }  # fmt: skip


@pytest.fixture(scope="module")
def info(server) -> pb.ModelInfo:
    return model_info(server.address)


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as channel:
        yield channel


_BREAKABLE = ("request_id", "top_k", "kind", "format", "blocks", "image")
_SEEN = {"valid": 0, "invalid": 0}


@st.composite
def requests(draw, info: pb.ModelInfo):
    """Fields that are valid except those drawn into ``broken`` (often none, so both sides are tried)."""
    classes = len(info.labels)
    blocks = list(info.attention_blocks)
    broken = draw(st.sets(st.sampled_from(_BREAKABLE), max_size=2))

    def pick(name, valid, invalid):
        return draw(invalid if name in broken else valid)

    return {
        "request_id": pick("request_id", st.just("") | st.text(max_size=128),
                           st.text(min_size=129, max_size=300)),
        "top_k": pick("top_k", st.integers(0, classes), st.integers(classes + 1, 2**32 - 1)),
        "kind": pick("kind", st.integers(0, 3), INT32.filter(lambda v: not 0 <= v <= 3)),
        "format": pick("format", st.integers(0, 1), INT32.filter(lambda v: not 0 <= v <= 1)),
        "blocks": pick(
            "blocks",
            st.lists(st.sampled_from(blocks), max_size=4),
            st.lists(st.sampled_from(blocks) | st.text(max_size=12).filter(lambda b: b not in blocks),
                     min_size=1, max_size=4).filter(lambda bs: any(b not in blocks for b in bs)),
        ),
        "image": pick("image", st.sampled_from(["png", "jpeg", "uint8", "float32"]),
                      st.sampled_from(["broken", "bad-shape", "too-large", "none"])),
    }  # fmt: skip


def _build(fields: dict, images) -> pb.ClassifyRequest:
    request = pb.ClassifyRequest()
    request.CopyFrom(images[fields["image"]][0])
    request.request_id = fields["request_id"]
    request.top_k = fields["top_k"]
    request.attention.kind = fields["kind"]
    request.attention.format = fields["format"]
    request.attention.blocks.extend(fields["blocks"])
    return request


def _problems(fields: dict, info: pb.ModelInfo, image_code: grpc.StatusCode) -> list[str]:
    """What the oracle finds wrong with a request (empty: it must succeed)."""
    known = set(info.attention_blocks)
    wrong = []
    if len(fields["request_id"]) > 128:
        wrong.append("request_id")
    if fields["top_k"] > len(info.labels):
        wrong.append("top_k")
    if not 0 <= fields["kind"] <= 3:
        wrong.append("attention.kind")
    if not 0 <= fields["format"] <= 1:
        wrong.append("attention.format")
    if any(b not in known for b in fields["blocks"]):
        wrong.append("attention.blocks")
    if image_code is not grpc.StatusCode.OK:
        wrong.append("image")
    return wrong


_KINDS = {1: {pb.ATTENTION_KIND_CHANNEL}, 2: {pb.ATTENTION_KIND_SPATIAL},
          3: {pb.ATTENTION_KIND_CHANNEL, pb.ATTENTION_KIND_SPATIAL}}  # fmt: skip


@given(data=st.data())
@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
def test_any_request_gets_a_matching_answer_or_a_clear_refusal(server, info, channel, data):
    images = _images(int(info.max_image_pixels))
    fields = data.draw(requests(info))
    request = _build(fields, images)
    problems = _problems(fields, info, images[fields["image"]][1])
    _SEEN["invalid" if problems else "valid"] += 1
    try:
        response = stub_for(channel).Classify(request, timeout=30)
    except grpc.RpcError as exc:
        code, message = exc.code(), exc.details() or ""
        assert problems, f"valid request refused: {code.name} {message}"
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), message
        if problems == ["image"]:
            assert code is images[fields["image"]][1], (code, message)
        assert message.startswith(FIELDS), f"the message names no field: {message!r}"
        return
    assert not problems, f"accepted a request with {problems}"
    check_response(response, info, fields["top_k"])
    if fields["request_id"]:
        assert response.request_id == fields["request_id"]
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", response.request_id)
    got = [(m.block, m.kind) for m in response.attention]
    assert len(got) == len(set(got)), "a map came twice"
    if fields["kind"] == 0:
        assert not got
    else:
        asked = set(fields["blocks"]) or set(info.attention_blocks)
        assert set(got) == {(b, k) for b in asked for k in _KINDS[fields["kind"]]}
        order = list(info.attention_blocks)
        assert [order.index(b) for b, _ in got] == sorted(order.index(b) for b, _ in got), "not network order"
        for m in response.attention:
            assert m.format == fields["format"]
            if m.format == pb.ATTENTION_FORMAT_FLOAT16:
                values = np.frombuffer(m.data, "<f2")
                assert values.size == int(np.prod(m.shape)) and np.isfinite(values).all()
                assert ((values >= 0) & (values <= 1)).all()
            else:
                assert m.data.startswith(b"\x89PNG")


def test_the_server_is_still_serving_after_the_properties(server):
    # and the properties tried both sides of the oracle, often
    print(f"request properties: {_SEEN}")
    assert _SEEN["valid"] >= 30 and _SEEN["invalid"] >= 30, _SEEN
    assert health_status(server.address) == "SERVING"
    assert not server.events_named("request failed")
