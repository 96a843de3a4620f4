"""A malicious pickle checkpoint is refused without running its code, by every way in; and no code in
the project opens a pickle (or YAML) unsafely.

The payload, if ever unpickled, writes a marker file; each test checks the marker never appears.
"""

from __future__ import annotations

import ast
import builtins
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.checkpoint import (
    CheckpointError,
    convert_official_checkpoint,
    load_checkpoint,
    load_official_checkpoint,
)
from server.launcher import child_env, run_to_exit
from tests.support import ROOT


class _Payload:
    """Unpickling this calls exec(): the classic arbitrary-code-execution pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).write_text('pwned')",)


def _evil_files(directory: Path, marker: Path) -> dict[str, Path]:
    """The same payload in the three containers torch.load knows: zip, legacy and a raw pickle."""
    state = {"state_dict": {"fc.weight": torch.zeros(2, 2)}, "extra": _Payload(marker)}
    files = {
        "zip": directory / "evil.pth",
        "legacy": directory / "evil-legacy.pth",
        "raw-pickle": directory / "evil.pkl",
    }
    torch.save(state, files["zip"])
    torch.save(state, files["legacy"], _use_new_zipfile_serialization=False)
    files["raw-pickle"].write_bytes(pickle.dumps(state, protocol=2))
    return files


@pytest.fixture
def evil(tmp_path) -> tuple[dict[str, Path], Path]:
    marker = tmp_path / "PWNED"
    files = _evil_files(tmp_path, marker)
    # The payload is real: an unsafe load runs it (proved once, on a copy, then the marker is removed).
    pickle.loads(files["raw-pickle"].read_bytes())  # noqa: S301 - deliberately unsafe, to prove the payload
    assert marker.exists()
    marker.unlink()
    return files, marker


@pytest.mark.parametrize("kind", ["zip", "legacy", "raw-pickle"])
def test_loading_an_official_checkpoint_refuses_a_malicious_pickle(evil, kind):
    files, marker = evil
    with pytest.raises(CheckpointError, match="refused|not a PyTorch checkpoint"):
        load_official_checkpoint(files[kind], "cbam_resnet18")
    assert not marker.exists(), "the pickle's code ran"


@pytest.mark.parametrize("kind", ["zip", "raw-pickle"])
def test_loading_a_pickle_as_our_checkpoint_refuses_it(evil, kind):
    files, marker = evil
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint"):
        load_checkpoint(files[kind])
    assert not marker.exists()


def test_converting_a_malicious_pickle_refuses_it(evil, tmp_path):
    files, marker = evil
    with pytest.raises(CheckpointError):
        convert_official_checkpoint(files["zip"], tmp_path / "out.safetensors", "cbam_resnet18")
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_the_convert_command_refuses_a_malicious_pickle(evil, tmp_path):
    files, marker = evil
    result = subprocess.run(
        [sys.executable, "-m", "models.cli", "convert", "--arch", "cbam_resnet18", str(files["zip"]),
         str(tmp_path / "out.safetensors")],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert not marker.exists()


def test_the_server_refuses_to_start_on_a_malicious_pickle(evil):
    files, marker = evil
    refused = run_to_exit("--checkpoint", str(files["zip"]))
    assert refused.returncode == 2
    assert "not a safetensors checkpoint" in refused.output
    assert not marker.exists()


# -- nothing in the code base opens a pickle unsafely ---------------------------------------------------

_SOURCES = ["models", "server", "client", "loadtest", "scripts", "proto/cbam"]


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            named_owner = isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
            owner = func.value.id if named_owner else ""
            yield node, owner, name


def _keyword(node: ast.Call, name: str):
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value
    return None


def test_no_code_unpickles_or_parses_yaml_unsafely():
    unsafe = []
    files = [p for d in _SOURCES for p in sorted((ROOT / d).rglob("*.py")) if "_pb2" not in p.name]
    assert len(files) > 20
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node, owner, name in _calls(tree):
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if owner == "torch" and name == "load":
                flag = _keyword(node, "weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    unsafe.append(f"{where}: torch.load without weights_only=True")
            elif owner in ("pickle", "cPickle", "dill", "joblib", "marshal", "shelve") and name in (
                "load", "loads", "Unpickler", "open",
            ):  # fmt: skip
                unsafe.append(f"{where}: {owner}.{name}")
            elif owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load"):
                unsafe.append(f"{where}: yaml.{name} (use yaml.safe_load)")
            elif owner in ("np", "numpy") and name == "load":
                flag = _keyword(node, "allow_pickle")
                if isinstance(flag, ast.Constant) and flag.value is True:
                    unsafe.append(f"{where}: numpy.load(allow_pickle=True)")
            elif isinstance(node.func, ast.Name) and name in ("eval", "exec") and path.parts[-2] in (
                "server", "client"
            ):  # the builtins; a module's .eval() is fine
                unsafe.append(f"{where}: {name}()")
    assert not unsafe, "\n".join(unsafe)
