"""Settings: defaults, CLI flags, CBAM_* variables, the config file, precedence, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from server.__main__ import main
from server.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_every_knob_has_a_working_default() -> None:
    s = load_settings([])
    assert (s.host, s.port, s.metrics.port, s.metrics.host) == ("[::]", 50051, 8000, "0.0.0.0")
    assert s.model.checkpoint is None and s.model.arch is None and s.model.device == "auto"
    assert s.batching.max_batch_size >= 1 and s.batching.max_queue >= 1
    assert s.reflection is True and s.log.level == "INFO" and s.log.json_ is True


def test_env_var_sets_a_nested_field(env) -> None:
    env.set("CBAM_BATCHING__MAX_BATCH_SIZE", "8")
    env.set("CBAM_PORT", "6000")
    s = load_settings([])
    assert s.batching.max_batch_size == 8 and s.port == 6000


def test_cli_flags_nested_and_shortcuts(env) -> None:
    s = load_settings(
        [
            "--batching.max_batch_size",
            "4",
            "--metrics-port",
            "0",
            "--arch",
            "cbam_resnet8_cifar",
            "--port",
            "1",
        ]
    )
    assert s.batching.max_batch_size == 4 and s.metrics.port == 0
    assert s.model.arch == "cbam_resnet8_cifar" and s.port == 1


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file(env, tmp_path: Path, suffix: str) -> None:
    data = {"port": 7000, "batching": {"max_queue": 10}, "log": {"json": False}}
    path = tmp_path / f"settings{suffix}"
    path.write_text(json.dumps(data))  # JSON is YAML too
    s = load_settings(["--config", str(path)])
    assert s.port == 7000 and s.batching.max_queue == 10 and s.log.json_ is False
    assert s.batching.max_batch_size == Settings.model_fields["batching"].default.max_batch_size


def test_config_file_named_by_env_var(env, tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text("batching:\n  max_batch_delay_ms: 7.5\n")
    env.set("CBAM_CONFIG", str(path))
    assert load_settings([]).batching.max_batch_delay_ms == 7.5


def test_precedence_cli_over_env_over_file_over_default(env, tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text("port: 1001\ngrace_seconds: 3\nbatching:\n  max_batch_size: 2\n  max_queue: 5\n")
    env.set("CBAM_PORT", "1002")
    env.set("CBAM_BATCHING__MAX_BATCH_SIZE", "3")
    s = load_settings(["--config", str(path), "--port", "1003"])
    assert s.port == 1003  # CLI over env and file
    assert s.batching.max_batch_size == 3  # env over file
    assert s.batching.max_queue == 5 and s.grace_seconds == 3  # file over default; env did not erase it
    assert s.batching.max_batch_delay_ms == 0.0  # default


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--batching.max_batch_size", "-1"], "batching.max_batch_size"),
        (["--batching.max_batch_size", "0"], "batching.max_batch_size"),
        (["--model.device", "tpu"], "model.device"),
        (["--checkpoint", "/no/such/file.safetensors"], "model.checkpoint"),
        (["--port", "70000"], "port"),
        (["--batching.max_batch_delay_ms", "-1"], "batching.max_batch_delay_ms"),
        (["--limits.max_image_pixels", "0"], "limits.max_image_pixels"),
        (["--tls.cert_file", __file__], "tls"),
        (["--oip.model_name", "my model/v2"], "oip.model_name"),
    ],
)
def test_invalid_values_name_the_field(env, argv: list[str], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        load_settings(argv)
    assert field in str(info.value)


def test_the_oip_group_defaults_to_serving_the_architectures_name(env) -> None:
    assert load_settings([]).oip.enabled and load_settings([]).oip.model_name is None
    env.set("CBAM_OIP__MODEL_NAME", "digits")
    s = load_settings(["--oip.enabled", "false"])
    assert (s.oip.enabled, s.oip.model_name) == (False, "digits")


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("CBAM_BATCHING__MAX_QUEUE", "-5", "batching.max_queue"),
        ("CBAM_AUTH__TOKENS", '["two words"]', "auth.tokens"),  # a token with whitespace
    ],
)
def test_invalid_env_value_names_the_field(env, variable: str, value: str, field: str) -> None:
    env.set(variable, value)
    with pytest.raises(ValidationError, match=field):
        load_settings([])


def test_unknown_key_in_config_file_is_refused(env, tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    path.write_text('{"batching": {"max_batch_sise": 4}}')
    with pytest.raises(ValidationError, match="batching.max_batch_sise"):
        load_settings(["--config", str(path)])


def test_main_exits_2_naming_the_field_without_traceback(env, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--batching.max_batch_size", "-1", "--model.device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert "batching.max_batch_size" in err and "model.device" in err and "Traceback" not in err


def test_main_exits_2_on_an_unreadable_config_file(env, tmp_path: Path, capsys) -> None:
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config" in capsys.readouterr().err


def test_main_exits_2_when_float16_is_asked_for_on_cpu(env, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--model.device", "cpu", "--model.dtype", "float16", "--arch", "cbam_resnet8_cifar",
                 "--metrics.enabled", "false", "--port", "0"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "model.dtype" in err and "Traceback" not in err


def _fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    names = []
    for name, info in model.model_fields.items():
        dotted = f"{prefix}{info.alias or name}"
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names += _fields(annotation, f"{dotted}.")
        else:
            names.append(dotted)
    return names


def test_help_shows_every_knob_with_its_description() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{ROOT / 'proto'}", "COLUMNS": "200"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for field in _fields(Settings):
        assert f"--{field}" in text, field
    for flag in ("--port", "--metrics-port", "--host", "--checkpoint", "--arch", "--config"):
        assert flag in text
    assert "Most requests in one forward pass." in text


@pytest.mark.parametrize(
    ("value", "expected"),
    [("a,b", ["a", "b"]), (" a , b ,", ["a", "b"]), ('["a", "b"]', ["a", "b"]), ("", [])],
)
def test_tokens_from_a_comma_or_json_list(env, value: str, expected: list[str]) -> None:
    env.set("CBAM_AUTH__TOKENS", value)
    assert [t.get_secret_value() for t in load_settings([]).auth.tokens] == expected


def test_tokens_file_adds_tokens_and_an_empty_one_is_refused(env, tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# comment\n tok-c \n\ntok-d\n")
    s = load_settings(["--auth.tokens", "tok-a", "--auth.tokens_file", str(path)])
    assert [t.get_secret_value() for t in s.auth.tokens] == ["tok-a", "tok-c", "tok-d"]
    assert "tok-" not in repr(s) and "tok-" not in s.model_dump_json()
    path.write_text("# none\n")
    with pytest.raises(ValidationError, match="auth"):
        load_settings(["--auth.tokens_file", str(path)])


def test_client_ca_without_requiring_certificates_is_refused(env, tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("x")
    tls = ["--tls.cert_file", str(pem), "--tls.key_file", str(pem), "--tls.client_ca_file", str(pem)]
    assert load_settings(tls).tls.client_auth_required
    with pytest.raises(ValidationError, match="require_client_auth"):
        load_settings([*tls, "--tls.require_client_auth", "false"])
    with pytest.raises(ValidationError, match="tls"):
        load_settings(["--tls.require_client_auth", "true"])


def test_a_refused_token_is_not_echoed(env, capsys: pytest.CaptureFixture[str]) -> None:
    env.set("CBAM_AUTH__TOKENS", "good-7f1c,bad secret-9e2a")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "auth.tokens" in err and "7f1c" not in err and "9e2a" not in err
