"""``onnxruntime``: the model exported to ONNX once, with every block's maps as extra outputs."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import importlib.util
import io
import logging
import time
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from models.cbam import AttentionMaps
from server.backends.base import BackendTarget, ModelBackend
from server.backends.cache import model_fingerprint

__all__ = ["OnnxRuntimeBackend"]

_log = logging.getLogger(__name__)


class OnnxRuntimeBackend(ModelBackend):
    """The model exported to ONNX (dynamic batch), with every block's maps as extra outputs; a batch asks
    ONNX Runtime for the logits and only the maps some request wanted.

    The export (3 s for the default model, 12 s for cbam_resnet50 here) is kept in the artefact cache,
    keyed by the model's fingerprint (structure and weights), its input size, torch's, onnxscript's and
    ONNX Runtime's versions: a later start with the same model loads the file instead.
    """

    @classmethod
    def missing(cls, target: BackendTarget) -> str | None:
        if target.dtype is not torch.float32:
            dtype = str(target.dtype).removeprefix("torch.")
            return f"runs the exported float32 graph; got model.dtype {dtype}"
        # Looked up, not imported: onnxscript (which torch's exporter needs) takes seconds to import,
        # and a start that finds its export in the cache never needs it.
        absent = [name for name in ("onnxruntime", "onnxscript") if importlib.util.find_spec(name) is None]
        if absent:
            return f"needs the onnx extra (pip install 'cbam-serve[onnx]'): {', '.join(absent)} not installed"
        return None

    def __init__(self, model: nn.Module, target: BackendTarget) -> None:
        import onnxruntime

        super().__init__(model, target)
        has_maps = hasattr(model, "forward_with_attention")
        self._layout = _map_layout(model, target.input_size) if has_maps else []
        names = ["logits", *(f"{block}/{kind}" for block, kind in self._layout)]
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = target.threads
        options.inter_op_num_threads = 1  # one batch at a time, as in the torch backends
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Its pool's threads spin between ops by default, taking the core from the event loop and
        # gRPC's threads that share it: on a busy 2-core machine, served throughput doubled for
        # cbam_resnet50 (and rose for the default model) without spinning (docs/PERFORMANCE.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise
        providers: list = ["CPUExecutionProvider"]
        if target.device.type == "cuda":
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": target.device.index or 0}))

        def session(graph: bytes | str) -> onnxruntime.InferenceSession:
            return onnxruntime.InferenceSession(graph, options, providers=providers)

        started = time.monotonic()
        exportable = _cpu_float32_copy(model)
        key = _cache_key(exportable, target.input_size, names)
        path = target.cache.path("onnx", key, ".onnx")
        self.cache_result = "off" if path is None else "miss"
        self._session = None
        if path is not None and path.is_file():
            try:
                self._session = session(str(path))
                self.cache_result = "hit"
            except Exception as exc:  # a damaged or foreign file: export again, and replace it
                fields = {"path": str(path), "error": str(exc)}
                _log.warning("cached ONNX file unusable", extra={"fields": fields})
        if self._session is None:
            data = _export_onnx(_EveryMap(exportable) if has_maps else exportable, target.input_size, names)
            if path is not None:
                target.cache.store(path, data)
            self._session = session(data)
        _log.info(
            "backend cache",
            extra={"fields": {"backend": "onnxruntime", "result": self.cache_result,
                              "path": None if path is None else str(path),
                              "seconds": round(time.monotonic() - started, 3)}},
        )  # fmt: skip
        self._input = self._session.get_inputs()[0].name
        self._outputs = {
            (block, kind): name for (block, kind), name in zip(self._layout, names[1:], strict=True)
        }

    def run(self, x: Tensor, blocks: Sequence[str] | None) -> tuple[Tensor, dict[str, AttentionMaps]]:
        chosen = set(blocks or ())
        wanted = [key for key in self._layout if key[0] in chosen]
        feed = {self._input: x.detach().float().cpu().contiguous().numpy()}
        logits, *maps = self._session.run(["logits", *(self._outputs[key] for key in wanted)], feed)
        found = _unflatten(wanted, [torch.from_numpy(m) for m in maps])
        return torch.from_numpy(logits), found


class _EveryMap(nn.Module):
    """``forward_with_attention`` for every block, as one flat tuple: logits, then each map that exists."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        logits, maps = self.model.forward_with_attention(x)
        return (logits, *(t for m in maps.values() for t in (m.channel, m.spatial) if t is not None))


def _map_layout(model: nn.Module, input_size: tuple[int, int]) -> list[tuple[str, str]]:
    """(block, kind) of each map output of ``_EveryMap``, in order (found by one tiny forward)."""
    parameter = next(model.parameters())
    x = torch.zeros(1, 3, *input_size, device=parameter.device, dtype=parameter.dtype)
    with torch.inference_mode():
        _, maps = model.forward_with_attention(x)
    return [
        (block, kind)
        for block, m in maps.items()
        for kind, t in (("channel", m.channel), ("spatial", m.spatial))
        if t is not None
    ]


def _unflatten(layout: Sequence[tuple[str, str]], tensors: Sequence[Tensor]) -> dict[str, AttentionMaps]:
    found: dict[str, dict[str, Tensor]] = {}
    for (block, kind), tensor in zip(layout, tensors, strict=True):
        found.setdefault(block, {})[kind] = tensor
    return {
        block: AttentionMaps(kinds.get("channel"), kinds.get("spatial")) for block, kinds in found.items()
    }


def _cache_key(model: nn.Module, input_size: tuple[int, int], outputs: Sequence[str]) -> str:
    versions = [f"{name} {importlib.metadata.version(name)}" for name in ("onnxscript", "onnxruntime")]
    parts = [
        model_fingerprint(model),
        f"input {input_size[0]}x{input_size[1]} float32",
        "outputs " + ",".join(outputs),
        f"torch {torch.__version__}",
        *versions,
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _export_onnx(model: nn.Module, input_size: tuple[int, int], output_names: list[str]) -> bytes:
    """The model as ONNX bytes: float32 on the CPU, dynamic batch, named outputs."""
    example = torch.zeros(2, 3, *input_size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed", once per export
    try:
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # the exporter's own deprecation notices, not ours to fix
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                input_names=["images"],
                output_names=output_names,
                dynamic_shapes=({0: batch},),
                verbose=False,
            )
    finally:
        quiet.setLevel(level)
    return program.model_proto.SerializeToString()


def _cpu_float32_copy(model: nn.Module) -> nn.Module:
    parameter = next(model.parameters(), None)
    if parameter is None or (parameter.device.type == "cpu" and parameter.dtype == torch.float32):
        return model.eval()
    return copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
