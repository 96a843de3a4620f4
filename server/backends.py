"""The ways one batch runs through the model (``model.backend``): eager PyTorch, torch.compile, ONNX Runtime.

    backend = create_backend("onnxruntime", model, device=..., dtype=..., input_size=(H, W), threads=2)
    logits, maps = backend.run(x, None)                  # x: B x 3 x H x W on the device
    logits, maps = backend.run(x, ["layer1.0", ...])     # maps: {block: AttentionMaps} for those blocks

``eager`` calls the module itself (so tests can wrap or patch it). ``compile`` runs a ``torch.compile``
graph with static shapes, so the runner pads each batch up to its bucket (``static_batch``); batches
with maps run eagerly. ``onnxruntime`` exports the model once, with every block's
maps as extra outputs, and fetches only the outputs a batch needs. docs/PERFORMANCE.md has the
measurements that chose between them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from models.cbam import AttentionMaps

__all__ = [
    "BACKENDS",
    "CompiledBackend",
    "EagerBackend",
    "ModelBackend",
    "OnnxRuntimeBackend",
    "create_backend",
]

BACKENDS = ("eager", "compile", "onnxruntime")
_log = logging.getLogger(__name__)


class ModelBackend:
    """One way to run batches. ``static_batch``: every batch size is a new graph, so pad to buckets."""

    static_batch = False

    def run(self, x: Tensor, blocks: Sequence[str] | None) -> tuple[Tensor, dict[str, AttentionMaps]]:
        """Logits (B x classes) and, when ``blocks`` is not None, those blocks' maps in network order."""
        raise NotImplementedError


class EagerBackend(ModelBackend):
    """The module as it is; ``model()`` is looked up on every batch, so a replaced module is served."""

    def __init__(self, model: Callable[[], nn.Module]) -> None:
        self._model = model

    def run(self, x: Tensor, blocks: Sequence[str] | None) -> tuple[Tensor, dict[str, AttentionMaps]]:
        model = self._model()
        if blocks is None:
            return model(x), {}
        return model.forward_with_attention(x, blocks=list(blocks))


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


class CompiledBackend(ModelBackend):
    """``torch.compile`` (Inductor) with frozen weights: BatchNorm folded into the convolutions, weights
    prepacked, CBAM's pooling, gating and residual fused. One graph per batch shape; on CUDA
    ``mode="reduce-overhead"`` also captures each shape as a CUDA graph.

    Batches that asked for maps run the eager module: a second graph per bucket would double a start
    that already takes minutes for a ResNet-50, for the rarer kind of request."""

    static_batch = True

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        from torch._inductor import config as inductor_config

        mode = "reduce-overhead" if device.type == "cuda" else None
        self._model = model
        self._plain = torch.compile(model, dynamic=False, fullgraph=True, mode=mode)
        # Freezing makes the weights constants of the graph (folded, prepacked): 1.5x on this CPU. It is
        # read when a shape compiles, on its first call, and torch.compile(options=...) does not turn it
        # on (measured), so every call runs under the patch. The served weights never change.
        self._freezing = inductor_config.patch(freezing=True)

    def run(self, x: Tensor, blocks: Sequence[str] | None) -> tuple[Tensor, dict[str, AttentionMaps]]:
        if blocks is None:
            with self._freezing:
                return self._plain(x), {}
        return self._model.forward_with_attention(x, blocks=list(blocks))


class OnnxRuntimeBackend(ModelBackend):
    """The model exported to ONNX once (dynamic batch), with every block's maps as extra outputs; a batch
    asks ONNX Runtime for the logits and only the maps some request wanted."""

    def __init__(
        self, model: nn.Module, device: torch.device, input_size: tuple[int, int], threads: int
    ) -> None:
        import onnxruntime  # the `onnx` extra

        has_maps = hasattr(model, "forward_with_attention")
        self._layout = _map_layout(model, input_size) if has_maps else []
        names = ["logits", *(f"{block}/{kind}" for block, kind in self._layout)]
        data = _export_onnx(_EveryMap(model) if has_maps else model, input_size, names)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # one batch at a time, as in the torch backends
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        self._session = onnxruntime.InferenceSession(data, options, providers=providers)
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


def _export_onnx(model: nn.Module, input_size: tuple[int, int], output_names: list[str]) -> bytes:
    """The model as ONNX bytes: float32 on the CPU, dynamic batch, named outputs."""
    model = _cpu_float32_copy(model)
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
    import copy

    return copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()


def create_backend(
    name: str,
    model: Callable[[], nn.Module],
    *,
    device: torch.device,
    dtype: torch.dtype,
    input_size: tuple[int, int],
    threads: int,
) -> ModelBackend:
    """Build backend ``name`` for the module ``model()``. Raises ValueError when it cannot run here."""
    if name == "eager":
        return EagerBackend(model)
    if name == "compile":
        return CompiledBackend(model(), device)
    if name == "onnxruntime":
        if dtype is not torch.float32:
            raise ValueError(f"onnxruntime runs the exported float32 graph; got model.dtype {dtype}")
        try:
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
        except ImportError as exc:
            raise ValueError(
                f"onnxruntime needs the onnx extra (pip install 'cbam-serve[onnx]'): {exc}"
            ) from None
        return OnnxRuntimeBackend(model(), device, input_size, threads)
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
