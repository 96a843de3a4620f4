"""Choosing the backend: the registry of names, ``model.backend auto`` (ONNX Runtime on a CPU when it is
installed, eager otherwise, eager when the preferred one fails its check), and the artefact cache (the
second start loads the exported file; a cache that cannot be written still serves)."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from cbam.v1 import inference_pb2 as pb
from models import CheckpointMetadata
from server.backends import AUTO, backend_choices, list_backends, register_backend
from server.backends.base import ModelBackend
from server.config import ModelSettings, load_settings
from server.errors import StartupError
from server.launcher import child_env
from server.loading import load_model
from server.runner import BatchItem, ModelRunner
from tests.server.conftest import png
from tests.support import ROOT

onnx_installed = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("onnxruntime", "onnxscript")),
    reason="needs the onnx extra",
)


def _events(records: list[logging.LogRecord], event: str) -> list[dict]:
    return [getattr(r, "fields", {}) for r in records if r.getMessage() == event]


def test_the_registry_names_every_backend_once_and_auto_first() -> None:
    assert list_backends() == ["eager", "compile", "onnxruntime"]
    assert backend_choices() == (AUTO, *list_backends())
    with pytest.raises(ValueError, match="already registered"):
        register_backend("eager", "server.backends.eager:EagerBackend", "again")
    with pytest.raises(ValueError, match="already registered"):
        register_backend(AUTO, "server.backends.eager:EagerBackend", "a backend may not be called auto")


def test_an_unknown_backend_is_refused_naming_the_field_and_the_choices() -> None:
    with pytest.raises(ValidationError) as info:
        load_settings(["--model.backend", "fastest"])
    message = str(info.value)
    assert "model.backend" in message and all(f"'{name}'" in message for name in backend_choices())


def test_help_lists_the_backends_without_importing_torch() -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "server", "--help"],
        cwd=ROOT, env=child_env({"COLUMNS": "200"}), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "{auto,eager,compile,onnxruntime}" in result.stdout
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "server.backends" in imported and "torch" not in imported


@onnx_installed
def test_auto_serves_onnxruntime_on_a_cpu_when_it_is_installed(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    runner = ModelRunner.from_settings(ModelSettings(device="cpu", cache_dir=tmp_path))
    assert runner.description.backend == "onnxruntime"
    (chosen,) = _events(caplog.records, "backend chosen")
    assert chosen["requested"] == AUTO and chosen["backend"] == "onnxruntime" and chosen["reason"]


def test_auto_serves_eager_when_onnxruntime_is_not_installed(tmp_path: Path) -> None:
    # A fresh interpreter in which importing onnxruntime fails, as without the onnx extra.
    code = """if True:
        import sys
        sys.modules["onnxruntime"] = None
        from server.config import ModelSettings
        from server.logs import configure_logging
        from server.runner import ModelRunner
        configure_logging("INFO")
        runner = ModelRunner.from_settings(ModelSettings(device="cpu", cache_dir=sys.argv[1]))
        print(runner.description.backend)
    """
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "eager"
    events = {e["event"]: e for e in map(json.loads, result.stderr.splitlines()) if "event" in e}
    assert events["backend fallback"]["backend"] == "onnxruntime"
    assert "onnxruntime not installed" in events["backend fallback"]["error"]
    assert events["backend chosen"]["backend"] == "eager"
    assert not (tmp_path / "onnx").exists()  # nothing was exported


class _ExportsDifferently(nn.Module):
    """A small classifier whose exported graph computes something else than the module does: what an
    exporter bug would look like to the server."""

    input_size = (8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc(x.mean(dim=(2, 3)))
        if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
            return logits + 1.0
        return logits


@onnx_installed
def test_auto_falls_back_to_eager_when_onnxruntime_fails_its_check(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    meta = CheckpointMetadata(
        arch="exports_differently", num_classes=4, labels=list("abcd"), input_size=(8, 8)
    )
    runner = ModelRunner(_ExportsDifferently(), meta, backend=AUTO, max_batch_size=2)
    assert runner.description.backend == "eager"
    (fallback,) = _events(caplog.records, "backend fallback")
    assert fallback["backend"] == "onnxruntime" and "differs from eager" in fallback["error"]
    # Asked for by name, the same backend is refused instead.
    with pytest.raises(StartupError, match="model.backend: onnxruntime differs from eager"):
        ModelRunner(_ExportsDifferently(), meta, backend="onnxruntime", max_batch_size=2)


def test_the_check_covers_batches_without_maps_too() -> None:
    class PlainPathWrong(ModelBackend):
        """Right maps, wrong logits when no map is asked for: what a bad compiled graph would give
        (compile runs batches with maps eagerly)."""

        def run(self, x, blocks):
            if blocks is None:
                return self.model(x) + 1.0, {}
            return self.model.forward_with_attention(x, blocks=list(blocks))

    model, meta = load_model(ModelSettings())
    with pytest.raises(StartupError, match="model.backend: PlainPathWrong differs from eager"):
        ModelRunner(model, meta, backend=PlainPathWrong(model))


@onnx_installed
def test_the_second_start_loads_the_cached_export(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    settings = ModelSettings(device="cpu", backend="onnxruntime", cache_dir=tmp_path)
    first = ModelRunner.from_settings(settings)
    second = ModelRunner.from_settings(settings)
    results = [(e["result"], e["path"]) for e in _events(caplog.records, "backend cache")]
    assert [r for r, _ in results] == ["miss", "hit"]
    assert results[0][1] == results[1][1] and Path(results[1][1]).parent == tmp_path / "onnx"
    items = [BatchItem(torch.randint(0, 256, (*first.description.input_size, 3), dtype=torch.uint8))]
    torch.testing.assert_close(first.run_batch(items)[0].logits, second.run_batch(items)[0].logits)


@onnx_installed
def test_a_damaged_cached_export_is_made_again(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    settings = ModelSettings(device="cpu", backend="onnxruntime", cache_dir=tmp_path)
    ModelRunner.from_settings(settings)
    (cached,) = (tmp_path / "onnx").glob("*.onnx")
    cached.write_bytes(b"not an ONNX graph")
    runner = ModelRunner.from_settings(settings)
    assert runner.description.backend == "onnxruntime"
    assert [e["result"] for e in _events(caplog.records, "backend cache")] == ["miss", "miss"]
    (unusable,) = _events(caplog.records, "cached ONNX file unusable")
    assert unusable["path"] == str(cached) and cached.stat().st_size > 1000  # replaced by a fresh export


@onnx_installed
def test_a_different_model_is_not_served_from_another_ones_export(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    for seed in (0, 1):
        settings = ModelSettings(arch="cbam_resnet8_cifar", num_classes=3, seed=seed, backend="onnxruntime",
                                 cache_dir=tmp_path)  # fmt: skip
        ModelRunner.from_settings(settings)
    assert [e["result"] for e in _events(caplog.records, "backend cache")] == ["miss", "miss"]
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 2


async def test_a_cache_that_cannot_be_written_still_serves(make_server, connect, tmp_path: Path, caplog):
    caplog.set_level(logging.INFO)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    server = await make_server("--model.cache_dir", str(blocker / "cache"))
    stub = connect(server)
    response = await stub.Classify(pb.ClassifyRequest(encoded=png(0)), timeout=30)
    assert response.labels
    (off,) = _events(caplog.records, "artefact cache off")
    assert off["cache_dir"] == str(blocker / "cache")


async def test_the_chosen_backend_is_reported_in_model_info_and_metrics(make_server, connect) -> None:
    server = await make_server()
    info = await connect(server).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.backend == server.pipeline.description.backend and info.backend in list_backends()
    labels = {"arch": info.arch, "version": info.version, "device": info.device, "dtype": info.dtype,
              "backend": info.backend}  # fmt: skip
    assert server.metrics.registry.get_sample_value("cbam_model_info", labels) == 1.0


async def test_a_backend_asked_for_by_name_is_reported(make_server, connect) -> None:
    server = await make_server("--model.backend", "eager")
    info = await connect(server).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.backend == "eager"
