"""The CLI's argument handling and file discovery, without a server (exit code 2 is usage)."""

import pytest

from client.cli import _attention_folders, _parser, find_images, main


def test_defaults_work_with_no_flags(monkeypatch):
    monkeypatch.delenv("CBAM_TARGET", raising=False)
    monkeypatch.delenv("CBAM_TOKEN", raising=False)
    args = _parser().parse_args(["classify", "a.png"])
    assert args.target == "localhost:50051"
    assert args.top_k == 5 and not args.json and args.attention is None
    assert args.token is None and args.timeout == 30.0


def test_token_and_target_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("CBAM_TOKEN", "s3cret")
    monkeypatch.setenv("CBAM_TARGET", "10.0.0.1:1234")
    args = _parser().parse_args(["health"])
    assert args.token == "s3cret" and args.target == "10.0.0.1:1234"
    assert _parser().parse_args(["health", "--token", "other"]).token == "other"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["classify"],
        ["frobnicate"],
        ["classify", "x.png", "--top-k", "many"],
        ["info", "--tls-cert", "c.pem"],
        ["health", "--timeout", "0"],
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_missing_path_and_empty_folder_are_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["classify", str(tmp_path / "nope.png"), "--target", "127.0.0.1:9"])
    assert exited.value.code == 2 and "no such file or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["classify", str(tmp_path), "--target", "127.0.0.1:9"])
    assert exited.value.code == 2 and "no images" in capsys.readouterr().err


def test_folders_are_searched_for_images_in_order(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/2.png", "1.JPG", "notes.txt", "b/0.webp"):
        (tmp_path / name).write_bytes(b"x")
    assert find_images([tmp_path, tmp_path / "notes.txt"]) == [
        tmp_path / "1.JPG",
        tmp_path / "b/0.webp",
        tmp_path / "b/2.png",
        tmp_path / "notes.txt",
    ]


def test_attention_folders_keep_images_of_the_same_name_apart(tmp_path):
    paths = [tmp_path / "a/x.png", tmp_path / "b/x.png", tmp_path / "y.png", tmp_path / "c/x.jpg"]
    names = [folder.name for folder in _attention_folders(paths, tmp_path / "out")]
    assert names == ["x", "x-2", "y", "x-3"]
