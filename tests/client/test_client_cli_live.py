"""cbam-client against a real cbam-serve: classify (table, --json, --attention), info, health."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from real_server import FIRST_SAMPLE, SAMPLES, sample_labels

from client.cli import main

LABELS = sample_labels()


def test_classify_a_folder_as_json_lines(live, capsys):
    assert main(["classify", str(SAMPLES), "--json", "--top-k", "2", "--target", live.address]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["path"] for r in records) == sorted(str(p) for p in LABELS)
    for record in records:
        assert record["labels"][0]["name"] == LABELS[Path(record["path"])]
        assert len(record["labels"]) == 2
        assert set(record["timings"]) >= {"queue_seconds", "inference_seconds", "batch_size"}


def test_classify_prints_a_table_of_top_k(live, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich folds long paths to fit the terminal
    assert main(["classify", str(FIRST_SAMPLE), "--top-k", "3", "--target", live.address]) == 0
    out = capsys.readouterr().out
    assert FIRST_SAMPLE.name in out and "#3" in out and "#4" not in out


def test_failed_items_make_exit_status_1(live, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    shutil.copy(FIRST_SAMPLE, tmp_path / "good.png")
    assert main(["classify", str(tmp_path), "--json", "--target", live.address]) == 1
    captured = capsys.readouterr()
    records = {Path(r["path"]).name: r for r in map(json.loads, captured.out.splitlines())}
    assert records["broken.png"]["error"]["code"] == "INVALID_ARGUMENT"
    assert records["good.png"]["labels"][0]["name"] == LABELS[FIRST_SAMPLE]
    assert "1 of 2 images failed" in captured.err


def test_attention_figures_for_every_image_and_block(live, tmp_path, capsys):
    images = list(LABELS)[:2]
    argv = ["classify", *map(str, images), "--attention", str(tmp_path), "--target", live.address]
    assert main(argv) == 0
    assert str(tmp_path / "index.html") in capsys.readouterr().err.replace("\n", "")
    blocks = ["layer1.0", "layer2.0", "layer3.0"]
    for image in images:
        folder = tmp_path / image.stem
        expected = {"figure.png", "input.png"} | {f"overlay_{b}.png" for b in blocks}
        assert {p.name for p in folder.iterdir()} == expected
        with Image.open(folder / "overlay_layer1.0.png") as overlay, Image.open(image) as original:
            assert overlay.mode == "RGB"
            assert overlay.width / overlay.height == original.width / original.height
        with Image.open(folder / "figure.png") as figure:
            assert figure.size == (1000, 980)  # 10 in wide, 2.6 in + 2.4 in per block high, at 100 dpi


def test_attention_blocks_colour_map_and_format_are_chosen(live, tmp_path, capsys):
    argv = ["classify", str(FIRST_SAMPLE), "--attention", str(tmp_path), "--blocks", "layer3.0,layer1.0",
            "--cmap", "magma", "--figure-format", "svg", "--target", live.address]  # fmt: skip
    assert main(argv) == 0
    folder = tmp_path / FIRST_SAMPLE.stem
    assert {p.name for p in folder.iterdir()} == {"figure.svg", "input.png", "overlay_layer1.0.png",
                                                  "overlay_layer3.0.png"}  # fmt: skip
    assert "layer3.0 alone, 8x8" in (folder / "figure.svg").read_text()
    capsys.readouterr()
    for argv, message in [
        (["--attention", str(tmp_path), "--blocks", "layer9"], "the model's attention blocks are layer1.0, "),
        (["--attention", str(tmp_path), "--cmap", "no-such-map"], "unknown colour map 'no-such-map'"),
        (["--blocks", "layer1.0"], "--blocks: only with --attention DIR"),
    ]:
        with pytest.raises(SystemExit) as exited:
            main(["classify", str(FIRST_SAMPLE), *argv, "--target", live.address])
        assert exited.value.code == 2 and message in capsys.readouterr().err


def test_without_matplotlib_classify_works_and_attention_names_the_extra(live, tmp_path):
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"  # as if it were not installed
        "from client.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = [sys.executable, "-c", code, "classify", str(FIRST_SAMPLE), "--json", "--target", live.address]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and json.loads(done.stdout)["labels"][0]["name"] == LABELS[FIRST_SAMPLE]
    done = subprocess.run([*argv, "--attention", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "pip install 'cbam-serve[load]'" in done.stderr
    assert list(tmp_path.iterdir()) == []  # refused before anything was sent or written


def test_info_and_health(live, capsys):
    assert main(["info", "--json", "--target", live.address]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["labels"] == [str(d) for d in range(10)] and info["attention_blocks"]
    assert info["max_batch_items"] == 256  # the server's default, for callers of classify_batch
    assert main(["info", "--target", live.address]) == 0
    assert "attention blocks" in capsys.readouterr().out
    assert main(["health", "--target", live.address]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


def test_the_installed_command(live):
    command = Path(sys.executable).parent / "cbam-client"
    argv = [str(command)] if command.exists() else [sys.executable, "-m", "client.cli"]
    done = subprocess.run(
        [*argv, "health", "--target", live.address], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "SERVING", done.stderr
    done = subprocess.run([*argv, "health", "--target", "127.0.0.1:1", "--timeout", "2"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 1 and "UNAVAILABLE" in done.stderr
