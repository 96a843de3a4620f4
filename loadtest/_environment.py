"""What the GPU check runs on: the device and driver, torch, CUDA and cuDNN, each package's version and
the folder it is imported from, and whether the stubs generated from proto/ import (their code checks
protobuf's and grpcio's versions as it loads)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import import_module, metadata
from importlib.util import find_spec
from pathlib import Path

__all__ = ["PACKAGES", "describe_environment", "no_cuda"]

# import name -> distribution: what the report lists, with version and where it was imported from
PACKAGES = {
    "torch": "torch",
    "grpc": "grpcio",
    "google.protobuf": "protobuf",
    "grpc_health": "grpcio-health-checking",
    "grpc_reflection": "grpcio-reflection",
    "pydantic": "pydantic",
    "pydantic_core": "pydantic-core",
    "pydantic_settings": "pydantic-settings",
    "prometheus_client": "prometheus-client",
    "numpy": "numpy",
    "PIL": "pillow",
    "safetensors": "safetensors",
    "yaml": "PyYAML",
    "onnx": "onnx",
    "onnxscript": "onnxscript",
    "onnxruntime": "onnxruntime",
    "pytest": "pytest",
    "pytest_asyncio": "pytest-asyncio",
}


def describe_environment(with_onnxruntime: bool = True) -> dict:
    """Versions and places of everything the check runs on, and whether the stubs import (the code
    generated from proto/ checks protobuf's and grpcio's versions as it loads). Packages are found, not
    imported (onnxscript alone takes seconds), except onnxruntime, for its providers, when it is used."""
    import torch

    from ._report import describe_machine

    cuda: dict = {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if cuda["available"]:
        cuda["cudnn"] = torch.backends.cudnn.version()
        cuda["devices"] = []
        for index in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(index)
            cuda["devices"].append({
                "name": p.name,
                "capability": f"{p.major}.{p.minor}",
                "memory_gib": round(p.total_memory / 2**30, 1),
                "multiprocessors": p.multi_processor_count,
            })  # fmt: skip
    smi = shutil.which("nvidia-smi")
    if smi:
        query = "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem"
        done = subprocess.run(
            [smi, query, "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
        cuda["nvidia_smi"] = (done.stdout or done.stderr).strip()
    packages = {name: _package(name, dist) for name, dist in PACKAGES.items()}
    if with_onnxruntime and "version" in packages["onnxruntime"]:
        packages["onnxruntime"]["providers"] = import_module("onnxruntime").get_available_providers()
    try:
        import_module("cbam.v1.inference_pb2")
        import_module("cbam.v1.inference_pb2_grpc")
        stubs = "ok"
    except Exception as exc:
        stubs = f"{type(exc).__name__}: {exc}"
    return {
        "machine": describe_machine(),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "cuda": cuda,
        "packages": packages,
        "stubs_import": stubs,
    }


def _package(name: str, distribution: str) -> dict:
    """Version and folder of what `import name` would load (both follow sys.path, PYTHONPATH first)."""
    try:
        spec = find_spec(name)
        version = metadata.version(distribution)
    except (ImportError, ValueError, metadata.PackageNotFoundError) as exc:
        return {"missing": f"{type(exc).__name__}: {exc}"}
    if spec is None:
        return {"missing": f"no module named {name!r}"}
    if spec.origin and spec.origin != "namespace":
        where = str(Path(spec.origin).parent)  # a package's folder, or the folder of a one-file module
    else:
        where = next(iter(spec.submodule_search_locations or []), None)
    return {"version": version, "from": where}


def no_cuda() -> str | None:
    """None when CUDA is usable, else why not."""
    import torch

    if torch.cuda.is_available():
        return None
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (
        f"CUDA asked for, but torch {torch.__version__} ({build}) sees no CUDA device "
        # CUDA's own variable, reported (not obeyed) here: it can hide every device from a process.
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
        "nothing was measured. On a machine without a GPU, run the CPU dry run: --dry-run"
    )
