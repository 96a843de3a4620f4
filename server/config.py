"""The one place cbam-serve's configuration is defined.

``Settings`` is filled, highest precedence first, from command-line flags, environment variables
(``CBAM_`` prefix, ``__`` between nested names), an optional YAML or JSON file (``--config FILE``)
and the defaults below. ``__main__`` builds it once and passes it down; nothing else reads the
environment.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from server.backends import AUTO, backend_choices, describe_backends

__all__ = [
    "Auth",
    "Batching",
    "Debug",
    "Limits",
    "Log",
    "Metrics",
    "ModelSettings",
    "Oip",
    "Settings",
    "Tls",
    "Tracing",
    "default_cache_dir",
    "load_settings",
    "read_config_file",
    "usable_cores",
]

_DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?|mps)$"
# The registered backends, read from server/backends (which imports no torch), and "auto".
BackendName = Literal[backend_choices()]  # type: ignore[valid-type]


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/cbam-serve, or ~/.cache/cbam-serve: the XDG convention, read from the environment
    as it prescribes (the one variable outside CBAM_* that the settings read)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cbam-serve"


MAX_WORKERS = 64


class _Group(BaseModel):
    # A misspelt key in the config file is refused, not silently ignored.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelSettings(_Group):
    """What to serve and how to run it."""

    checkpoint: FilePath | None = Field(
        None, description="Checkpoint to serve (.safetensors); unset serves the embedded default model."
    )
    arch: str | None = Field(
        None,
        description="Serve this registered architecture with random weights instead of a checkpoint "
        "(for benchmarking): labels class_0.., registry input size, ImageNet mean/std.",
    )
    num_classes: int = Field(1000, ge=1, description="Number of classes of a random-weight --arch model.")
    seed: int = Field(0, description="Seed for the random weights of an --arch model.")
    device: str = Field(
        "auto",
        pattern=_DEVICE_PATTERN,
        description="auto (CUDA when present, else CPU), cpu, cuda or cuda:N.",
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Compute dtype; float16 needs CUDA, bfloat16 runs on CUDA and CPU."
    )
    channels_last: bool = Field(True, description="Run convolutions on channels-last (NHWC) memory.")
    backend: BackendName = Field(
        AUTO,
        description="How batches run: auto (the fastest measured for the device among those installed: "
        "onnxruntime on a CPU, else eager; falls back to eager if it fails its check); "
        f"{describe_backends()}.",
    )
    cache_dir: Path | None = Field(
        default_factory=default_cache_dir,
        description="Where built backends are kept between starts (exported ONNX files, Inductor's "
        "compiled kernels), made if missing; default $XDG_CACHE_HOME/cbam-serve or ~/.cache/cbam-serve. "
        "Empty turns the cache off; one that cannot be written serves without it (logged).",
    )

    @field_validator("cache_dir", mode="before")
    @classmethod
    def _empty_is_off(cls, value: Any) -> Any:
        if isinstance(value, str):
            return Path(value).expanduser() if value.strip() else None
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ModelSettings:
        if self.checkpoint is not None and self.arch is not None:
            raise ValueError("give model.checkpoint or model.arch, not both")
        return self


class Batching(_Group):
    """Dynamic batching, with the semantics of Triton's dynamic batcher."""

    max_batch_size: int = Field(32, ge=1, le=4096, description="Most requests in one forward pass.")
    # 0, as Triton's default: requests that arrive while a batch computes already form the next one,
    # and at low load any wait is pure latency (+2 ms per call at concurrency 1 with 2 ms measured).
    max_batch_delay_ms: float = Field(
        0.0, ge=0, le=60_000, description="Longest wait for a batch to fill, from its oldest request."
    )
    max_queue: int = Field(
        1024, ge=1, description="Most requests waiting for a batch; beyond it RESOURCE_EXHAUSTED at once."
    )


class Limits(_Group):
    """Limits on what one caller may ask of the server."""

    max_message_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest request message, in bytes (RESOURCE_EXHAUSTED above)."
    )
    max_image_pixels: int = Field(
        40_000_000,
        ge=1,
        # Pillow's WebP plugin refuses more than twice PIL.Image.MAX_IMAGE_PIXELS (89,478,485) as it
        # opens the file, before our own check could allow it: a larger limit would not hold for WebP.
        le=178_956_970,
        description="Largest image, width x height before resizing (RESOURCE_EXHAUSTED above).",
    )
    max_stream_inflight: int = Field(
        64, ge=1, description="Most items of one ClassifyStream call being handled at once."
    )
    max_batch_items: int = Field(
        256,
        ge=1,
        description="Most images in one ClassifyBatch call or one ModelInfer request (INVALID_ARGUMENT "
        "above).",
    )
    max_concurrent_streams: int = Field(
        256, ge=1, description="Most concurrent HTTP/2 streams (calls) on one connection."
    )
    max_concurrent_rpcs: int = Field(
        4096, ge=1, description="Most calls the server handles at once; beyond it RESOURCE_EXHAUSTED."
    )
    max_pending_calls: int = Field(
        16384,
        ge=1,
        description="Most calls gRPC holds for the server before it takes them up (a burst's backlog); "
        "beyond it gRPC cancels new calls at once (CANCELLED).",
    )


class Oip(_Group):
    """The Open Inference Protocol (KServe v2 / Triton gRPC), served beside cbam.v1 on the same port."""

    enabled: bool = Field(
        True, description="Serve inference.GRPCInferenceService (tritonclient, KServe grpc-v2) on the port."
    )
    model_name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
        description="The model's name in that protocol; unset means the architecture's (e.g. "
        "cbam_resnet8_cifar). Its version is the checkpoint's.",
    )


class Tls(_Group):
    """Transport security; without a certificate the port is plaintext."""

    cert_file: FilePath | None = Field(None, description="PEM server certificate chain.")
    key_file: FilePath | None = Field(None, description="PEM private key of the certificate.")
    client_ca_file: FilePath | None = Field(
        None, description="PEM CA bundle that client certificates are checked against (mutual TLS)."
    )
    require_client_auth: bool | None = Field(
        None,
        description="Refuse clients without a certificate signed by tls.client_ca_file; unset means "
        "true whenever a client CA is given (false with a client CA is refused: it could not be checked).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Tls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together: set both or neither")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("tls.client_ca_file needs tls.cert_file and tls.key_file")
        if self.require_client_auth and self.client_ca_file is None:
            raise ValueError("tls.require_client_auth needs tls.client_ca_file to check certificates against")
        if self.client_ca_file is not None and self.require_client_auth is False:
            # grpcio's ssl_server_credentials cannot ask for a certificate and verify it only when
            # presented: without "require", it never asks, and the CA would check nothing.
            raise ValueError(
                "tls.require_client_auth false with tls.client_ca_file: gRPC for Python cannot verify "
                "optional client certificates; drop tls.client_ca_file or require client certificates"
            )
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @property
    def client_auth_required(self) -> bool:
        # A client CA with require_client_auth false is refused at start (grpcio cannot make it optional).
        return self.client_ca_file is not None


class Auth(_Group):
    """Bearer-token authentication of inference calls, both protocols (health and reflection stay open)."""

    # NoDecode: the environment may give a comma list ("a,b") as well as a JSON list.
    tokens: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description='Accepted tokens, sent as "authorization: Bearer TOKEN" (a comma or JSON list); '
        "with tokens_file empty too, authentication is off.",
    )
    tokens_file: FilePath | None = Field(
        None, description="File of more accepted tokens, one a line (# starts a comment)."
    )

    @field_validator("tokens", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [token.strip() for token in text.split(",") if token.strip()]
        return value

    @field_validator("tokens")
    @classmethod
    def _no_blanks(cls, tokens: list[SecretStr]) -> list[SecretStr]:
        for token in tokens:
            secret = token.get_secret_value()
            if not secret or any(c.isspace() or c == "," for c in secret):
                raise ValueError("a token may not be empty or hold whitespace or commas")
        return tokens

    @model_validator(mode="after")
    def _read_tokens_file(self) -> Auth:
        if self.tokens_file is not None:
            lines = self.tokens_file.read_text(encoding="utf-8").splitlines()
            found = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
            if not found:
                raise ValueError(f"auth.tokens_file: {self.tokens_file} holds no token")
            self.tokens = [*self.tokens, *self._no_blanks([SecretStr(token) for token in found])]
        return self


class Metrics(_Group):
    """The Prometheus /metrics HTTP endpoint."""

    enabled: bool = Field(True, description="Serve /metrics.")
    host: str = Field("0.0.0.0", description="Address the /metrics endpoint binds.")
    port: int = Field(8000, ge=0, le=65535, description="Port of the /metrics endpoint; 0 picks a free one.")


class Log(_Group):
    """Logging."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Least severe level logged; DEBUG logs every request."
    )
    # Named json_ because BaseModel has a .json(); it reads and prints as "json" everywhere.
    json_: bool = Field(True, alias="json", description="One JSON object per line; false for plain text.")

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


# OpenTelemetry's own convention (the OTLP exporter specification): either variable names a collector,
# and naming one turns tracing on. The one place below __main__ that reads the environment, because
# that convention says so; the SDK reads the other OTEL_* variables itself (server/tracing.py).
OTLP_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
OTLP_PROTOCOL_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
OTLP_PROTOCOLS = ("grpc", "http/protobuf")


class Tracing(_Group):
    """OpenTelemetry traces, exported with OTLP (needs the tracing extra). The OTEL_* variables
    (OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER(_ARG), OTEL_EXPORTER_OTLP_*) fill what is left unset here."""

    enabled: bool | None = Field(
        None,
        description="Record and export traces; unset means on when OTEL_EXPORTER_OTLP_ENDPOINT or "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set (pip install 'cbam-serve[tracing]').",
    )
    endpoint: str | None = Field(
        None,
        description="OTLP collector, e.g. http://otel-collector:4317; unset: "
        "OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, else http://localhost:4317.",
    )
    sample_ratio: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Share of new traces recorded (a caller's own sampling decision is followed); "
        "unset: OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG, else every trace.",
    )
    service_name: str | None = Field(
        None, description="service.name of the spans; unset: OTEL_SERVICE_NAME, else cbam-serve."
    )
    protocol: Literal["grpc", "http/protobuf"] | None = Field(
        None,
        description="OTLP transport; unset: OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL, else grpc (port 4317; "
        "http/protobuf goes to port 4318, path /v1/traces).",
    )
    stage_spans: bool = Field(
        True,
        description="Record preprocess, queue wait and postprocess as child spans of each request; "
        "false records them as events on the request span, which costs less.",
    )

    @model_validator(mode="after")
    def _from_environment(self) -> Tracing:
        if self.enabled is None:
            self.enabled = any(os.environ.get(name) for name in OTLP_ENDPOINT_VARIABLES)
        if self.protocol is None:
            name = next((name for name in OTLP_PROTOCOL_VARIABLES if os.environ.get(name)), None)
            value = os.environ[name].strip() if name else "grpc"
            if value not in OTLP_PROTOCOLS:
                raise ValueError(f"{name}={value!r}: cbam-serve exports OTLP as grpc or http/protobuf")
            self.protocol = value  # type: ignore[assignment]
        return self


class Debug(_Group):
    """Fault injection for reliability runs (scripts/faults.py); off in production."""

    fail_batch_on_sigusr1: bool = Field(
        False,
        description="Each SIGUSR1 makes the next batch's forward raise once, as a model fault would "
        "(the batch is then run again in halves). For fault-injection runs only.",
    )


class Settings(BaseSettings):
    """cbam-serve: a gRPC inference service for CBAM-ResNet image classifiers.

    Precedence, highest first: command-line flags, CBAM_* environment variables
    (CBAM_BATCHING__MAX_BATCH_SIZE=8), the --config file (YAML or JSON), defaults.
    """

    model_config = SettingsConfigDict(
        env_prefix="CBAM_",
        env_nested_delimiter="__",
        extra="forbid",
        populate_by_name=True,
        validate_default=True,
        cli_prog_name="cbam-serve",
        cli_shortcuts={
            "metrics.port": "metrics-port",
            "model.checkpoint": "checkpoint",
            "model.arch": "arch",
        },
        cli_hide_none_type=True,
        cli_avoid_json=True,
    )

    config: Path | None = Field(
        None, description="YAML or JSON settings file; flags and CBAM_* variables override it."
    )
    host: str = Field("[::]", description="Address the gRPC port binds; [::] is every interface.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    grace_seconds: float = Field(
        10.0, ge=0, description="On SIGTERM/SIGINT, how long calls in flight and queued get to finish."
    )
    drain_delay_seconds: float = Field(
        0.0,
        ge=0,
        description="On SIGTERM/SIGINT, keep taking calls this long after health turns NOT_SERVING, "
        "so load balancers move traffic away before the port closes.",
    )
    reflection: bool = Field(True, description="Offer gRPC server reflection.")
    preprocess_threads: int = Field(
        0,
        ge=0,
        description="Threads that decode and resize images, per worker; 0 = half the worker's share of "
        "the usable cores, at least 1.",
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="Intra-op threads of one worker's forward pass; 0 = the worker's share of the usable "
        "cores (all of them with one worker).",
    )
    workers: int = Field(
        0,
        ge=0,
        le=MAX_WORKERS,
        description="Server processes sharing the gRPC port, each with its own model replica, batcher and "
        "share of the cores, under one supervisor; 0 = one per 4 usable cores, 1 to 8 "
        "(docs/OPERATIONS.md).",
    )
    model: ModelSettings = ModelSettings()
    batching: Batching = Batching()
    limits: Limits = Limits()
    tls: Tls = Tls()
    auth: Auth = Auth()
    oip: Oip = Oip()
    metrics: Metrics = Metrics()
    log: Log = Log()
    tracing: Tracing = Field(default_factory=Tracing)  # a factory: its default reads the environment
    debug: Debug = Debug()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # pydantic-settings puts the CLI source in front of these, so: CLI > init > env > file.
        return init_settings, env_settings, _ConfigFileSource(settings_cls)


class _ConfigFileSource(PydanticBaseSettingsSource):
    """Reads the file named by ``config`` as given by a higher-precedence source (flag or env var)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ reads the whole file at once

    def __call__(self) -> dict[str, Any]:
        path = self.current_state.get("config")
        if path is None:
            return {}
        return read_config_file(Path(path))


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a YAML (.yaml, .yml) or JSON (anything else) settings file into a dict."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"config: cannot read {str(path)!r}: {exc.strerror}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml  # only needed for YAML files

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise ValueError(
            f"config: {str(path)!r} is not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config: {str(path)!r} must hold a mapping of settings, got {type(data).__name__}")
    return data


def load_settings(argv: list[str] | None = None) -> Settings:
    """Build the Settings from ``argv`` (default: sys.argv[1:]), the environment and the config file."""
    return Settings(_cli_parse_args=argv if argv is not None else True)


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask (not the machine's count), or fewer where a
    CPU quota allows less (a container's CPU limit: cgroup v2 cpu.max, or v1 cfs quota and period)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
    quota = _cpu_quota(Path("/sys/fs/cgroup"))
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


def _cpu_quota(cgroup: Path) -> float | None:
    """The CPUs' worth of time a cgroup quota allows (1.5 for "150000 100000"), or None: no quota."""
    try:
        quota, _, period = (cgroup / "cpu.max").read_text().partition(" ")
    except OSError:
        try:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text()
        except OSError:
            return None
    quota, period = quota.strip(), period.strip()
    if quota in ("max", "-1") or not quota.lstrip("-").isdigit() or not period.isdigit() or not int(period):
        return None
    return int(quota) / int(period)
