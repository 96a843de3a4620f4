import io

import numpy as np
import pytest
from PIL import Image

from cbam.v1 import inference_pb2
from client._images import set_image


def _request(image) -> inference_pb2.ClassifyRequest:
    request = inference_pb2.ClassifyRequest()
    set_image(request, image)
    return request


def _png(mode: str = "RGB", size=(5, 4)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 7).save(buffer, format="PNG")
    return buffer.getvalue()


def test_path_and_bytes_go_as_the_encoded_file(tmp_path):
    data = _png()
    (tmp_path / "x.png").write_bytes(data)
    assert _request(tmp_path / "x.png").encoded == data
    assert _request(str(tmp_path / "x.png")).encoded == data
    assert _request(data).encoded == data
    assert _request(bytearray(data)).encoded == data
    assert _request(memoryview(data)).encoded == data


def test_missing_path_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        _request(tmp_path / "nope.png")


@pytest.mark.parametrize(("mode", "channels"), [("RGB", 3), ("L", 1), ("RGBA", 4), ("P", 3), ("CMYK", 3)])
def test_pil_image_goes_as_a_uint8_hwc_tensor(mode, channels):
    image = Image.new(mode, (5, 4))
    tensor = _request(image).tensor
    assert tensor.dtype == inference_pb2.Tensor.DTYPE_UINT8
    assert list(tensor.shape) == [4, 5, channels]
    assert len(tensor.data) == 4 * 5 * channels


def test_uint8_array_keeps_its_pixels_in_row_major_order():
    array = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    tensor = _request(array[:, ::-1]).tensor  # a non-contiguous view is made contiguous first
    assert list(tensor.shape) == [2, 3, 3]
    assert np.array_equal(np.frombuffer(tensor.data, np.uint8).reshape(2, 3, 3), array[:, ::-1])


def test_grey_uint8_array_gets_a_channel_axis():
    assert list(_request(np.zeros((4, 6), np.uint8)).tensor.shape) == [4, 6, 1]


def test_float_array_goes_as_little_endian_float32_chw():
    array = np.linspace(0, 1, 3 * 2 * 2, dtype=">f8").reshape(3, 2, 2)
    tensor = _request(array).tensor
    assert tensor.dtype == inference_pb2.Tensor.DTYPE_FLOAT32
    assert list(tensor.shape) == [3, 2, 2]
    assert np.allclose(np.frombuffer(tensor.data, "<f4").reshape(3, 2, 2), array)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((4, 4, 2), np.uint8), "C in 1, 3, 4, got (4, 4, 2)"),
        (np.zeros((4, 4, 3), np.float32), "3 x H x W"),
        (np.zeros((3, 4, 4), np.int32), "uint8 or floating point, got int32"),
    ],
)
def test_bad_arrays_are_refused_naming_what_they_got(array, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _request(array)


def test_other_types_are_refused():
    with pytest.raises(TypeError, match="got list"):
        _request([1, 2, 3])
