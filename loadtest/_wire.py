"""The few protobuf messages of the peers' gRPC protocols that the peer comparison sends, framed by hand.

Triton's `inference.GRPCInferenceService/ModelInfer` (the Open Inference Protocol) and TorchServe's
`org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions` are the peers' own .proto files; rather
than copy them, the request fields used here are written with protobuf's wire format (field numbers from
their published protocols) and the answers read back the same way. The field numbers are checked against
the live servers by every run's verification calls.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

__all__ = ["grpc_frame", "model_infer_request", "predictions_request", "read_fields"]

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


def grpc_frame(message: bytes) -> bytes:
    """One gRPC message on the wire: not compressed (0), its length (4 bytes, big-endian), the message."""
    return b"\0" + struct.pack(">I", len(message)) + message


def model_infer_request(
    model_name: str, input_name: str, datatype: str, shape: Sequence[int], raw: bytes, outputs: Sequence[str]
) -> bytes:
    """ModelInferRequest: one input tensor given as raw_input_contents, the named outputs asked for."""
    tensor = _string(1, input_name) + _string(2, datatype) + _length(3, b"".join(_varint(d) for d in shape))
    return (
        _string(1, model_name)
        + _length(5, tensor)  # inputs
        + b"".join(_length(6, _string(1, name)) for name in outputs)  # outputs
        + _length(7, raw)  # raw_input_contents
    )


def predictions_request(model_name: str, inputs: dict[str, bytes]) -> bytes:
    """TorchServe's PredictionsRequest: model_name and the input map (name -> bytes)."""
    entries = b"".join(_length(3, _string(1, key) + _length(2, value)) for key, value in inputs.items())
    return _string(1, model_name) + entries


def read_fields(message: bytes) -> dict[int, list[int | bytes]]:
    """Every field of one message by number: varints as ints, fixed-width and length-delimited as bytes."""
    fields: dict[int, list[int | bytes]] = {}
    at = 0
    while at < len(message):
        key, at = _read_varint(message, at)
        number, kind = key >> 3, key & 7
        if kind == _VARINT:
            value, at = _read_varint(message, at)
        elif kind == _LENGTH:
            size, at = _read_varint(message, at)
            value, at = message[at : at + size], at + size
        elif kind in (_FIXED64, _FIXED32):
            width = 8 if kind == _FIXED64 else 4
            value, at = message[at : at + width], at + width
        else:
            raise ValueError(f"wire type {kind} of field {number} is not read here")
        if at > len(message):
            raise ValueError(f"field {number} runs past the end of a {len(message)}-byte message")
        fields.setdefault(number, []).append(value)
    return fields


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # negative int64s take ten bytes, two's complement
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data):
            raise ValueError("a varint runs past the end of the message")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not byte & 0x80:
            return value, at


def _length(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | _LENGTH) + _varint(len(payload)) + payload


def _string(number: int, text: str) -> bytes:
    return _length(number, text.encode())
