import io

import numpy as np
import pytest
from PIL import Image

from cbam.v1 import inference_pb2
from client._messages import build_request, decode_attention_map, to_model_info, to_prediction


def _float16_map(block, kind, values: np.ndarray) -> inference_pb2.AttentionMap:
    return inference_pb2.AttentionMap(
        block=block,
        kind=kind,
        shape=list(values.shape),
        format=inference_pb2.ATTENTION_FORMAT_FLOAT16,
        data=values.astype("<f2").tobytes(),
    )


def _png_map(block, kind, values: np.ndarray) -> inference_pb2.AttentionMap:
    pixels = np.round(values * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.reshape(1, -1) if pixels.ndim == 1 else pixels, "L").save(buffer, format="PNG")
    return inference_pb2.AttentionMap(
        block=block,
        kind=kind,
        shape=list(values.shape),
        format=inference_pb2.ATTENTION_FORMAT_PNG,
        data=buffer.getvalue(),
    )


@pytest.mark.parametrize("encode", [_float16_map, _png_map])
def test_spatial_and_channel_maps_decode_to_float32_of_their_shape(encode):
    rng = np.random.default_rng(0)
    spatial, channel = rng.random((7, 5)), rng.random(16)
    tolerance = 1e-3 if encode is _float16_map else 1 / 255
    cases = ((spatial, inference_pb2.ATTENTION_KIND_SPATIAL), (channel, inference_pb2.ATTENTION_KIND_CHANNEL))
    for values, kind in cases:
        decoded = decode_attention_map(encode("layer1.0", kind, values))
        assert decoded.dtype == np.float32
        assert decoded.shape == values.shape
        assert np.abs(decoded - values).max() <= tolerance


def test_map_whose_data_disagrees_with_its_shape_is_refused():
    message = _float16_map("layer1.0", inference_pb2.ATTENTION_KIND_SPATIAL, np.zeros((4, 4)))
    message.shape[:] = [5, 4]
    with pytest.raises(ValueError, match="16 values, its shape says"):
        decode_attention_map(message)


def test_prediction_groups_maps_by_block_in_network_order():
    response = inference_pb2.ClassifyResponse(
        request_id="r1",
        labels=[
            inference_pb2.Label(index=3, name="three", probability=0.75),
            inference_pb2.Label(index=8, name="eight", probability=0.25),
        ],
        attention=[
            _float16_map("layer1.0", inference_pb2.ATTENTION_KIND_CHANNEL, np.full(8, 0.5)),
            _float16_map("layer1.0", inference_pb2.ATTENTION_KIND_SPATIAL, np.full((4, 4), 0.25)),
            _png_map("layer2.0", inference_pb2.ATTENTION_KIND_SPATIAL, np.ones((2, 2))),
        ],
        model_version="v1",
        timings=inference_pb2.Timings(queue_seconds=0.5, batch_size=4),
    )
    prediction = to_prediction(response)
    assert prediction.top.name == "three"
    assert [label.index for label in prediction.labels] == [3, 8]
    assert list(prediction.attention) == ["layer1.0", "layer2.0"]
    assert set(prediction.attention["layer1.0"]) == {"channel", "spatial"}
    assert prediction.attention["layer2.0"]["spatial"].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert prediction.timings.batch_size == 4 and prediction.timings.queue_seconds == 0.5
    assert prediction.model_version == "v1"


def test_request_carries_the_attention_asked_for():
    request = build_request(
        b"png",
        request_id="a",
        top_k=3,
        attention="spatial",
        attention_blocks=["layer1.0"],
        attention_format="png",
    )
    assert request.top_k == 3 and request.request_id == "a"
    assert request.attention.kind == inference_pb2.ATTENTION_KIND_SPATIAL
    assert list(request.attention.blocks) == ["layer1.0"]
    assert request.attention.format == inference_pb2.ATTENTION_FORMAT_PNG
    assert not build_request(b"png").HasField("attention")
    assert not build_request(b"png", attention="none").HasField("attention")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_k": -1}, "top_k should be >= 0"),
        ({"attention": "all"}, "attention should be one of"),
        ({"attention_format": "jpeg"}, "attention_format should be one of"),
    ],
)
def test_bad_request_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_request(b"png", **kwargs)


def test_model_info_becomes_plain_types():
    info = to_model_info(
        inference_pb2.ModelInfo(
            arch="cbam_resnet8_cifar",
            labels=["0", "1"],
            input_height=32,
            input_width=30,
            mean=[0.5] * 3,
            std=[0.25] * 3,
            attention_blocks=["layer1.0"],
            num_parameters=1234,
            batching=inference_pb2.BatchingInfo(max_batch_size=32, max_batch_delay_ms=2.0, max_queue=1024),
        )
    )
    assert info.input_size == (32, 30)
    assert info.batching.max_batch_size == 32
    assert info.labels == ["0", "1"] and info.mean == (0.5, 0.5, 0.5)
