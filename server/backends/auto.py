"""``model.backend auto``: the backends to try, fastest first, for a device (docs/PERFORMANCE.md,
"model.backend auto"). The runner builds the first that can run here, checks it against eager, and
falls back to the next when it cannot be built or differs; eager, last, always serves.

Only backends that start within seconds are candidates: ``compile`` serves cbam_resnet50 a little
faster than ONNX Runtime on a CPU but takes minutes to start (even with its kernels cached), so it
stays a choice to make by name.
"""

from __future__ import annotations

from server.backends.base import BackendTarget

__all__ = ["auto_backend", "auto_candidates"]

# Measured on a 2-core CPU (docs/PERFORMANCE.md, "model.backend auto"): served throughput and p50,
# eager, onnxruntime and compile interleaved, the default model and cbam_resnet50.
_CPU = [
    ("onnxruntime", "served fastest on a CPU among the backends that start in seconds "
                    "(docs/PERFORMANCE.md); its export is cached between starts"),
    ("eager", "the reference; needs nothing installed or built"),
]  # fmt: skip
# No GPU was at hand to measure on: eager (with CUDA's own kernels) until a measurement says otherwise.
_OTHER = [("eager", "not measured on this device; eager is the reference")]


def auto_candidates(target: BackendTarget) -> list[tuple[str, str]]:
    """(backend, why) in the order to try them on ``target``; the last is always eager."""
    return list(_CPU if target.device.type == "cpu" else _OTHER)


def auto_backend(target: BackendTarget) -> str:
    """The backend ``auto`` tries first on ``target``: the first candidate installed and able to run its
    dtype (what the benchmark's ceiling runs; the server itself also falls back when a build fails)."""
    from server.backends import backend_class

    return next(name for name, _ in auto_candidates(target) if backend_class(name).missing(target) is None)
