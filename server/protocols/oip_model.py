"""What the Open Inference Protocol says about the served model: its name and version, its tensors, and
the answers of ModelMetadata, ModelConfig, ModelStatistics and RepositoryIndex.

Inputs (exactly one per request; N images along the first dimension):
    images              UINT8 [N, H, W, 3]   pixels at the model's input size (the fast path)
    encoded_images      BYTES [N, 1]         image files (JPEG, PNG, WebP, BMP, GIF), decoded and resized
    normalized_images   FP32  [N, 3, H, W]   already normalised with the model's mean and std
Outputs (probabilities by default; anything else only when asked for):
    probabilities                   FP32 [N, classes]   or, asked with classification=k, BYTES [N, k]
    attention/<block>/channel       FP32 [N, C]         (FP16 with the request parameter
    attention/<block>/spatial       FP32 [N, H', W']     attention_datatype=FP16)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cbam.oip import grpc_service_pb2 as pb
from cbam.oip import model_config_pb2 as config_pb
from server.config import Settings
from server.errors import InvalidInput, NotFound
from server.metrics import Totals
from server.runner import ModelDescription

__all__ = [
    "INFERENCE_METHODS",
    "INPUT_FILES",
    "INPUT_NORMALIZED",
    "INPUT_PIXELS",
    "OUTPUT_PROBABILITIES",
    "ModelIdentity",
    "OipModel",
    "TensorSpec",
    "map_output_name",
]

INPUT_PIXELS = "images"
INPUT_FILES = "encoded_images"
INPUT_NORMALIZED = "normalized_images"
OUTPUT_PROBABILITIES = "probabilities"
# The RPCs of both protocols that run the model: ModelStatistics counts their calls.
INFERENCE_METHODS = ("Classify", "ClassifyStream", "ClassifyBatch", "ModelInfer", "ModelStreamInfer")
_PLATFORM = "pytorch"
_CONFIG_TYPES = {"UINT8": config_pb.TYPE_UINT8, "BYTES": config_pb.TYPE_STRING, "FP32": config_pb.TYPE_FP32}


def map_output_name(block: str, kind: str) -> str:
    """The output that carries one block's map of one kind ("channel" or "spatial")."""
    return f"attention/{block}/{kind}"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor; ``dims`` leave out the batch (first) dimension."""

    name: str
    datatype: str  # the protocol's: UINT8, BYTES, FP32
    dims: tuple[int, ...]
    format: int = config_pb.ModelInput.FORMAT_NONE

    def shape_text(self) -> str:
        return "[" + ", ".join(["N", *map(str, self.dims)]) + "]"


@dataclass(frozen=True)
class ModelIdentity:
    """The served model's name and version, known before it is warm."""

    name: str
    version: str

    def check(self, name: str, version: str) -> None:
        """Raise NotFound unless ``name`` (and ``version``, when given) is the served model."""
        if name != self.name:
            raise NotFound(f"model {name!r} is not served here; this server serves {self.name!r}")
        if version and version != self.version:
            raise NotFound(f"model {name!r} has no version {version!r}; it serves version {self.version!r}")


@dataclass(frozen=True)
class OipModel:
    """The served model as the protocol describes it (built once its attention maps were measured)."""

    identity: ModelIdentity
    description: ModelDescription
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]  # probabilities, then every map in network order
    maps: Mapping[str, tuple[str, str]]  # output name -> (block, kind)
    settings: Settings

    @classmethod
    def describe(
        cls,
        identity: ModelIdentity,
        description: ModelDescription,
        attention_shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
        settings: Settings,
    ) -> OipModel:
        height, width = description.input_size
        inputs = (
            TensorSpec(INPUT_PIXELS, "UINT8", (height, width, 3), config_pb.ModelInput.FORMAT_NHWC),
            TensorSpec(INPUT_FILES, "BYTES", (1,)),
            TensorSpec(INPUT_NORMALIZED, "FP32", (3, height, width), config_pb.ModelInput.FORMAT_NCHW),
        )
        maps = {
            map_output_name(block, kind): (block, kind)
            for block, kinds in attention_shapes.items()
            for kind in ("channel", "spatial")
            if kind in kinds
        }
        outputs = (
            TensorSpec(OUTPUT_PROBABILITIES, "FP32", (len(description.labels),)),
            *(
                TensorSpec(name, "FP32", tuple(attention_shapes[block][kind]))
                for name, (block, kind) in maps.items()
            ),
        )
        return cls(identity, description, inputs, outputs, maps, settings)

    @property
    def classes(self) -> int:
        return len(self.description.labels)

    def input(self, name: str) -> TensorSpec:
        """The input called ``name``; InvalidInput naming the choices when there is none."""
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise InvalidInput(f"input {name!r}: this model has no such input; send one of {self.inputs_text()}")

    def output(self, name: str) -> TensorSpec:
        """The output called ``name``; InvalidInput naming the choices when there is none."""
        for spec in self.outputs:
            if spec.name == name:
                return spec
        blocks = list(dict.fromkeys(block for block, _ in self.maps.values()))
        raise InvalidInput(
            f"output {name!r}: this model has no such output; its outputs are {OUTPUT_PROBABILITIES!r} "
            f"and 'attention/<block>/channel' or '.../spatial' for the blocks {blocks}"
        )

    def inputs_text(self) -> str:
        return ", ".join(f"{s.name!r} ({s.datatype} {s.shape_text()})" for s in self.inputs)

    def metadata(self) -> pb.ModelMetadataResponse:
        d = self.description
        response = pb.ModelMetadataResponse(
            name=self.identity.name, versions=[self.identity.version], platform=_PLATFORM
        )
        for spec in self.inputs:
            response.inputs.add(name=spec.name, datatype=spec.datatype, shape=[-1, *spec.dims])
        for spec in self.outputs:
            response.outputs.add(name=spec.name, datatype=spec.datatype, shape=[-1, *spec.dims])
        response.properties.update(
            {"arch": d.arch, "device": d.device, "dtype": d.dtype, "labels": ",".join(d.labels)}
        )
        return response

    def config(self) -> pb.ModelConfigResponse:
        d, batching = self.description, self.settings.batching
        config = config_pb.ModelConfig(
            name=self.identity.name,
            platform=_PLATFORM,
            backend="cbam-serve",
            # A request may hold this many images; the batcher splits them into forward passes of
            # at most batching.max_batch_size (the preferred batch size below).
            max_batch_size=self.settings.limits.max_batch_items,
        )
        for spec in self.inputs:
            config.input.add(
                name=spec.name, data_type=_CONFIG_TYPES[spec.datatype], format=spec.format, dims=spec.dims,
                optional=True,  # one of the three per request
            )  # fmt: skip
        for spec in self.outputs:
            config.output.add(name=spec.name, data_type=_CONFIG_TYPES[spec.datatype], dims=spec.dims)
        gpu = d.device.startswith("cuda")
        group = config.instance_group.add(name=self.identity.name, count=1)
        group.kind = config_pb.ModelInstanceGroup.KIND_GPU if gpu else config_pb.ModelInstanceGroup.KIND_CPU
        if gpu:
            group.gpus.append(int(d.device.partition(":")[2] or 0))
        dynamic = config.dynamic_batching
        dynamic.preferred_batch_size.append(batching.max_batch_size)
        dynamic.max_queue_delay_microseconds = round(batching.max_batch_delay_ms * 1000)
        dynamic.preserve_ordering = True
        dynamic.default_queue_policy.max_queue_size = batching.max_queue
        parameters = {
            "arch": d.arch,
            "mean": ",".join(f"{v:g}" for v in d.mean),
            "std": ",".join(f"{v:g}" for v in d.std),
            "dtype": d.dtype,
            "model_backend": d.backend,
            "labels": ",".join(d.labels),
        }
        for key, value in parameters.items():
            config.parameters[key].string_value = value
        return pb.ModelConfigResponse(config=config)

    def statistics(self, totals: Totals) -> pb.ModelStatistics:
        """The model's cumulative statistics: every inference call of either protocol, and the
        pipeline's stage times (compute_input: decoding and checking images; compute_infer: forward
        passes, counted once per batch; compute_output: encoding what was asked for)."""
        stats = pb.ModelStatistics(
            name=self.identity.name,
            version=self.identity.version,
            inference_count=totals.images,
            execution_count=totals.batches,
        )
        infer = stats.inference_stats
        for field, (count, seconds) in (
            (infer.success, totals.succeeded),
            (infer.fail, totals.failed),
            (infer.queue, totals.stages["queue"]),
            (infer.compute_input, totals.stages["preprocess"]),
            (infer.compute_infer, totals.stages["inference"]),
            (infer.compute_output, totals.stages["postprocess"]),
        ):
            field.count, field.ns = count, round(seconds * 1e9)
        return stats
