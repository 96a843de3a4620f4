"""A ModelInferRequest's tensors to a TensorQuery, and a TensorPrediction to its ModelInferResponse.

Every check names the tensor (or parameter) and says what it got and what is allowed; a request that
fails one gets INVALID_ARGUMENT (UNIMPLEMENTED for a feature this server does not have) and never
reaches the batcher, so nothing else in a batch can fail with it. A UINT8 batch in raw_input_contents
becomes one tensor with one copy, whatever its size: no per-image work.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cbam.oip import grpc_service_pb2 as pb
from server.errors import InvalidInput, Unsupported
from server.pipeline import TensorPrediction, TensorQuery
from server.protocols.oip_model import OUTPUT_PROBABILITIES, OipModel, TensorSpec

__all__ = [
    "ATTENTION_DATATYPE",
    "InferOptions",
    "RequestedOutput",
    "parse_options",
    "parse_outputs",
    "to_response",
    "to_tensor_query",
]

# The request parameter that picks the maps' datatype.
ATTENTION_DATATYPE = "attention_datatype"
_TIMEOUT = "timeout"  # Triton's: microseconds the server may spend on the request
_EMPTY_FINAL_RESPONSE = "triton_enable_empty_final_response"  # tritonclient's streams may send it
_NOT_IMPLEMENTED = {
    "sequence_id": "sequence batching is not implemented: the model keeps no state between requests",
    "sequence_start": "sequence batching is not implemented: the model keeps no state between requests",
    "sequence_end": "sequence batching is not implemented: the model keeps no state between requests",
    "priority": "priority levels are not implemented: every request waits in the one queue",
}
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
_NUMPY = {"UINT8": np.uint8, "FP32": np.dtype("<f4")}
_MAP_DTYPES = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2")}
_LENGTH = struct.Struct("<I")  # a BYTES element's length prefix


@dataclass(frozen=True)
class InferOptions:
    """A request's parameters, checked."""

    attention_datatype: str = "FP32"
    timeout_s: float | None = None
    final_response_flag: bool = False


@dataclass(frozen=True)
class RequestedOutput:
    """One output a request asked for; ``class_count`` > 0 asks for its top classes as BYTES."""

    spec: TensorSpec
    class_count: int = 0


def parse_options(parameters: Mapping[str, pb.InferParameter]) -> InferOptions:
    """Check a request's parameters. Unknown ones are INVALID_ARGUMENT, known features this server
    lacks UNIMPLEMENTED."""
    options: dict[str, object] = {}
    for key, value in parameters.items():
        kind = value.WhichOneof("parameter_choice")
        if key in _NOT_IMPLEMENTED:
            raise Unsupported(f"parameter {key!r}: {_NOT_IMPLEMENTED[key]}")
        if key == ATTENTION_DATATYPE:
            if kind != "string_param" or value.string_param not in _MAP_DTYPES:
                raise InvalidInput(f"parameter {key!r}: {_shown(value)}; use the string FP32 or FP16")
            options["attention_datatype"] = value.string_param
        elif key == _TIMEOUT:
            if kind not in ("int64_param", "uint64_param") or getattr(value, kind) <= 0:
                raise InvalidInput(
                    f"parameter {key!r}: {_shown(value)}; use a positive integer of microseconds"
                )
            options["timeout_s"] = getattr(value, kind) / 1e6
        elif key == _EMPTY_FINAL_RESPONSE:
            options["final_response_flag"] = kind == "bool_param" and value.bool_param
        else:
            raise InvalidInput(
                f"parameter {key!r}: not a parameter of this server; it takes {ATTENTION_DATATYPE!r} "
                f"(FP32 or FP16) and {_TIMEOUT!r} (microseconds)"
            )
    return InferOptions(**options)  # type: ignore[arg-type]


def parse_outputs(
    outputs: Sequence[pb.ModelInferRequest.InferRequestedOutputTensor], model: OipModel
) -> list[RequestedOutput]:
    """The outputs asked for, in their order; none asked means the probabilities."""
    if not outputs:
        return [RequestedOutput(model.output(OUTPUT_PROBABILITIES))]
    wanted: list[RequestedOutput] = []
    seen: set[str] = set()
    for output in outputs:
        name = output.name
        spec = model.output(name)
        if name in seen:
            raise InvalidInput(f"output {name!r}: asked for twice")
        seen.add(name)
        class_count = 0
        for key, value in output.parameters.items():
            kind = value.WhichOneof("parameter_choice")
            if key == "classification":
                if name != OUTPUT_PROBABILITIES:
                    raise InvalidInput(
                        f"output {name!r}: classification applies to {OUTPUT_PROBABILITIES!r} only"
                    )
                if kind not in ("int64_param", "uint64_param") or getattr(value, kind) < 1:
                    raise InvalidInput(
                        f"output {name!r}: classification {_shown(value)}; use an integer >= 1"
                    )
                # As Triton: more classes than the model has gives them all.
                class_count = min(getattr(value, kind), model.classes)
            elif key in _SHARED_MEMORY:
                raise Unsupported(
                    f"output {name!r}: shared memory is not implemented; take outputs in the response"
                )
            else:
                raise InvalidInput(
                    f"output {name!r}: unknown parameter {key!r}; outputs take 'classification'"
                )
        wanted.append(RequestedOutput(spec, class_count))
    return wanted


def to_tensor_query(
    request: pb.ModelInferRequest,
    model: OipModel,
    outputs: Sequence[RequestedOutput],
    request_id: str,
    max_images: int,
) -> TensorQuery:
    """The request's one input tensor as images for the pipeline, with what it asked to compute."""
    images = _images(request, model, max_images)
    class_counts = [o.class_count for o in outputs if o.class_count]
    blocks = frozenset(model.maps[o.spec.name][0] for o in outputs if o.spec.name in model.maps)
    return TensorQuery(
        request_id=request_id,
        images=images,
        probabilities=any(o.spec.name == OUTPUT_PROBABILITIES and not o.class_count for o in outputs),
        top_k=max(class_counts, default=0),
        blocks=blocks or None,
    )


def _images(request: pb.ModelInferRequest, model: OipModel, max_images: int) -> torch.Tensor | list[bytes]:
    if len(request.inputs) != 1:
        given = [tensor.name for tensor in request.inputs]
        raise InvalidInput(f"inputs: {given or 'none'}; send exactly one of {model.inputs_text()}")
    tensor = request.inputs[0]
    name = tensor.name
    spec = model.input(name)
    for key in tensor.parameters:
        if key in _SHARED_MEMORY:
            raise Unsupported(
                f"input {name!r}: shared memory is not implemented; send the tensor in the request"
            )
        raise InvalidInput(f"input {name!r}: unknown parameter {key!r}; inputs take none")
    if tensor.datatype != spec.datatype:
        raise InvalidInput(f"input {name!r}: datatype {tensor.datatype!r}, but {name!r} is {spec.datatype} "
                           f"{spec.shape_text()}")  # fmt: skip
    shape = tuple(tensor.shape)
    if len(shape) != 1 + len(spec.dims) or shape[1:] != spec.dims or shape[0] < 1:
        raise InvalidInput(f"input {name!r}: shape {list(shape)}, but {name!r} is {spec.datatype} "
                           f"{spec.shape_text()} with N >= 1")  # fmt: skip
    count = shape[0]
    if count > max_images:
        raise InvalidInput(f"input {name!r}: {count} images, at most {max_images} in one request "
                           "(limits.max_batch_items); split them over several requests")  # fmt: skip
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidInput(f"raw_input_contents: {len(request.raw_input_contents)} entries for 1 input")
        if tensor.HasField("contents"):
            raise InvalidInput(f"input {name!r}: both contents and raw_input_contents; send one of them")
        raw = request.raw_input_contents[0]
        if spec.datatype == "BYTES":
            return _split_bytes(name, raw, count)
        return _from_raw(spec, name, raw, shape)
    if spec.datatype == "BYTES":
        elements = list(tensor.contents.bytes_contents)
        if len(elements) != count:
            raise InvalidInput(f"input {name!r}: {len(elements)} elements in contents.bytes_contents, but "
                               f"shape {list(shape)} holds {count}")  # fmt: skip
        _check_files(name, elements)
        return elements
    return _from_contents(spec, name, tensor.contents, shape)


def _from_raw(spec: TensorSpec, name: str, raw: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    dtype = np.dtype(_NUMPY[spec.datatype])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInput(f"input {name!r}: {len(raw)} bytes in raw_input_contents, but shape "
                           f"{list(shape)} of {spec.datatype} needs {expected}")  # fmt: skip
    # One copy into a writable buffer (the message's bytes are read-only): the whole batch at once.
    array = np.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)
    return _checked(spec, name, array)


def _from_contents(
    spec: TensorSpec, name: str, contents: pb.InferTensorContents, shape: tuple[int, ...]
) -> torch.Tensor:
    field = "uint_contents" if spec.datatype == "UINT8" else "fp32_contents"
    values = getattr(contents, field)
    expected = int(np.prod(shape))
    if len(values) != expected:
        raise InvalidInput(
            f"input {name!r}: {len(values)} values in contents.{field}, but shape {list(shape)} holds "
            f"{expected}" + ("" if values else "; send the tensor in raw_input_contents or contents")
        )
    if spec.datatype == "UINT8":
        wide = np.asarray(values, dtype=np.int64)
        if wide.max() > 255:
            raise InvalidInput(
                f"input {name!r}: contents.uint_contents holds {int(wide.max())}; UINT8 is 0..255"
            )
        array = wide.astype(np.uint8)
    else:
        array = np.asarray(values, dtype=np.float32)
    return _checked(spec, name, array.reshape(shape))


def _checked(spec: TensorSpec, name: str, array: np.ndarray) -> torch.Tensor:
    if spec.datatype == "FP32" and not np.isfinite(array).all():
        raise InvalidInput(f"input {name!r}: holds NaN or Inf")
    return torch.from_numpy(array)


def _split_bytes(name: str, raw: bytes, count: int) -> list[bytes]:
    """A raw BYTES tensor's elements: each a 4-byte little-endian length, then that many bytes."""
    elements, offset = [], 0
    for i in range(count):
        if offset + _LENGTH.size > len(raw):
            raise InvalidInput(f"input {name!r}: raw_input_contents ends before element {i} of {count} "
                               "(each is a 4-byte little-endian length, then the bytes)")  # fmt: skip
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise InvalidInput(f"input {name!r}: element {i} claims {length} bytes, but "
                               f"raw_input_contents has {len(raw) - offset} left")  # fmt: skip
        elements.append(raw[offset : offset + length])
        offset += length
    if offset != len(raw):
        raise InvalidInput(f"input {name!r}: {len(raw) - offset} bytes left in raw_input_contents after "
                           f"the {count} elements its shape holds")  # fmt: skip
    _check_files(name, elements)
    return elements


def _check_files(name: str, elements: Sequence[bytes]) -> None:
    for i, element in enumerate(elements):
        if not element:
            raise InvalidInput(f"input {name!r}: element {i} is empty; send an image file")


def to_response(
    request: pb.ModelInferRequest,
    model: OipModel,
    outputs: Sequence[RequestedOutput],
    options: InferOptions,
    prediction: TensorPrediction,
) -> pb.ModelInferResponse:
    """The response: each output asked for, in order, in raw_output_contents."""
    response = pb.ModelInferResponse(
        model_name=model.identity.name, model_version=model.identity.version, id=request.id
    )
    if options.final_response_flag:
        response.parameters["triton_final_response"].bool_param = True
    rows = _rows(prediction)
    for output in outputs:
        name = output.spec.name
        if output.class_count:
            assert prediction.top_k is not None
            values, indices = (t[:, : output.class_count] for t in prediction.top_k)
            data, datatype = _classes(values, indices, model.description.labels), "BYTES"
            dims: tuple[int, ...] = (output.class_count,)
        else:
            if name == OUTPUT_PROBABILITIES:
                assert prediction.probabilities is not None
                array, datatype = prediction.probabilities.numpy(), "FP32"
            else:
                block, kind = model.maps[name]
                array, datatype = prediction.maps[block][kind].numpy(), options.attention_datatype
            data, dims = array.astype(_MAP_DTYPES[datatype], copy=False).tobytes(), tuple(array.shape[1:])
        response.outputs.add(name=name, datatype=datatype, shape=[rows, *dims])
        response.raw_output_contents.append(data)
    return response


def _rows(prediction: TensorPrediction) -> int:
    for tensor in (prediction.probabilities, *(prediction.top_k or ())):
        if tensor is not None:
            return int(tensor.shape[0])
    return int(next(t for kinds in prediction.maps.values() for t in kinds.values()).shape[0])


def _classes(values: torch.Tensor, indices: torch.Tensor, labels: Sequence[str]) -> bytes:
    """Top classes as Triton's classification extension writes them: "<score>:<index>:<label>", the
    score as C's %f (std::to_string), each element length-prefixed."""
    strings = [
        f"{score:f}:{index}:{labels[index]}".encode()
        for row_scores, row_indices in zip(values.tolist(), indices.tolist(), strict=True)
        for score, index in zip(row_scores, row_indices, strict=True)
    ]
    return b"".join(_LENGTH.pack(len(s)) + s for s in strings)


def _shown(value: pb.InferParameter) -> str:
    kind = value.WhichOneof("parameter_choice")
    return "no value" if kind is None else f"{kind.removesuffix('_param')} {getattr(value, kind)!r}"
