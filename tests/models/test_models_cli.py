import json
from pathlib import Path

import pytest

from models import cli, list_models, load_checkpoint
from models.cli import main


@pytest.fixture(scope="module")
def listed() -> list[dict]:
    """``cbam-models list --json``, run once: counting every model's MACs takes a few seconds."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["list", "--json"]) == 0
    return json.loads(out.getvalue())


@pytest.mark.slow
def test_list_json_gives_params_and_macs_for_every_model(listed):
    entries = {e["name"]: e for e in listed}
    assert sorted(entries) == list_models()
    for entry in entries.values():
        assert {"name", "params", "macs", "input_size"} <= set(entry)
    assert entries["cbam_resnet50"]["params"] == 28_089_624
    assert entries["cbam_resnet50"]["input_size"] == [224, 224]
    assert entries["cbam_resnet8_cifar"]["input_size"] == [32, 32]
    # Multiply-adds at 224x224 (reference/CBAM_REFERENCE.md): 1.815 G / 3.665 G, and 4.096 G for the
    # stride-on-3x3 bottleneck layout we use.
    assert round(entries["cbam_resnet18"]["macs"] / 1e9, 3) == 1.815
    assert round(entries["cbam_resnet34"]["macs"] / 1e9, 3) == 3.665
    assert round(entries["cbam_resnet50"]["macs"] / 1e9, 3) == 4.096
    assert round(entries["resnet50"]["macs"] / 1e9, 3) == 4.089


@pytest.mark.slow
def test_list_prints_a_table(listed, capsys, monkeypatch):
    monkeypatch.setattr(cli, "describe_models", lambda: listed)
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "cbam_resnet50" in out and "28,089,624" in out


def test_convert(official_resnet18_file, tmp_path, capsys):
    _, path = official_resnet18_file
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class {i}" for i in range(1000)) + "\n")
    dst = tmp_path / "out.safetensors"
    code = main(
        [
            "convert",
            "--arch",
            "cbam_resnet18",
            str(path),
            str(dst),
            "--labels",
            str(labels),
            "--version",
            "v7",
        ]
    )
    assert code == 0 and "cbam_resnet18" in capsys.readouterr().out
    _, meta = load_checkpoint(dst)
    assert meta.version == "v7" and meta.labels[999] == "class 999"


def test_errors_exit_non_zero_with_a_message(tmp_path, capsys):
    assert main(["convert", "--arch", "cbam_resnet18", str(tmp_path / "x.pth"), str(tmp_path / "y")]) == 1
    assert "no checkpoint file at" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "absent.safetensors")]) == 1
    with pytest.raises(SystemExit):
        main(["convert", "--arch", "cbam_resnet9", "a", "b"])


def test_evaluate_prints_json(capsys, monkeypatch):
    import models.train

    # The real evaluation is test_default_model's; here only the command's wiring and output.
    seen = {}

    def fake_evaluate(checkpoint, seed):
        seen.update(checkpoint=checkpoint, seed=seed)
        return {"accuracy": 0.99, "correct": 99, "total": 100, "arch": "a", "version": "v", "seed": seed}

    monkeypatch.setattr(models.train, "evaluate", fake_evaluate)
    assert main(["evaluate", "--json", "--seed", "3", "--checkpoint", "x.safetensors"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 0.99
    assert seen == {"checkpoint": Path("x.safetensors"), "seed": 3}
    assert main(["evaluate"]) == 0
    assert "held-out accuracy 99.00% (99/100, seed 0)" in capsys.readouterr().out
