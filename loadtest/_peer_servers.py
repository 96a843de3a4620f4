"""The servers of the peer comparison: cbam-serve, Triton (PyTriton) and TorchServe, each started on free
loopback ports, serving the same checkpoint, and spoken to in its own gRPC protocol.

Each one says how to ask for one image's top-1 class (the request message h2load sends), how to read the
answer, which processes are its own (for their CPU time) and how many answers it counted itself. The
peers run in their own virtual environments (`cbam-bench --peers --setup`), their model code is ours
(`loadtest/peer_launchers/`, with our `models` package copied beside it), nothing of theirs is copied.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from server.launcher import ServerProcess, scrape

from ._wire import model_infer_request, predictions_request, read_fields

__all__ = ["Answer", "CbamServe", "PyTriton", "Served", "TorchServe", "copy_models_package", "free_port"]

LAUNCHERS = Path(__file__).parent / "peer_launchers"


@dataclass(frozen=True)
class Answer:
    """One image's top-1 class, as a server answered it."""

    index: int
    probability: float


class Served:
    """One server in the comparison. Subclasses fill in how it starts and how it is spoken to."""

    name: str = ""
    protocol: str = ""  # what the load generator speaks to it, in words
    method: str = ""  # the gRPC method's path
    target: str = ""  # host:port of its gRPC endpoint, once started

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def request(self, pixels: np.ndarray) -> bytes:
        """The serialized request asking for the top-1 class of `pixels` (uint8 H x W x 3)."""
        raise NotImplementedError

    def read_answer(self, message: bytes) -> Answer:
        raise NotImplementedError

    def answered(self) -> float | None:
        """Requests the server counts as answered (its own metrics), to check the generator's count;
        None where it keeps no such count."""
        raise NotImplementedError

    def pids(self) -> list[int]:
        """The server's root processes; their children are counted with them."""
        raise NotImplementedError

    def settings(self) -> dict:
        """What the server runs with, as it reports it (after start)."""
        raise NotImplementedError

    def cpu_seconds(self) -> float:
        """User + system CPU of every process of the server (children too, reaped ones included)."""
        total = 0.0
        for pid in self.pids():
            try:
                root = psutil.Process(pid)
                processes = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for process in processes:
                try:
                    times = process.cpu_times()
                except psutil.NoSuchProcess:
                    continue
                total += times.user + times.system + times.children_user + times.children_system
        return total


class CbamServe(Served):
    """cbam-serve with its defaults: `cbam-serve --checkpoint FILE` on free loopback ports, nothing else."""

    name = "cbam-serve"
    protocol = "cbam.v1 Classify, a uint8 H x W x 3 tensor, top_k=1"
    method = "/cbam.v1.InferenceService/Classify"

    def __init__(self, checkpoint: Path, startup_timeout: float = 900.0) -> None:
        self._server = ServerProcess("--checkpoint", str(checkpoint), startup_timeout=startup_timeout)

    def start(self) -> None:
        self._server.start()
        self.target = self._server.address

    def stop(self) -> None:
        self._server.stop()  # SIGTERM: it drains (and is killed if it takes too long)
        self._server.kill()  # whatever is left of its process group

    def request(self, pixels: np.ndarray) -> bytes:
        from cbam.v1 import inference_pb2

        tensor = inference_pb2.Tensor(
            dtype=inference_pb2.Tensor.DTYPE_UINT8, shape=list(pixels.shape), data=pixels.tobytes()
        )
        return inference_pb2.ClassifyRequest(tensor=tensor, top_k=1).SerializeToString()

    def read_answer(self, message: bytes) -> Answer:
        from cbam.v1 import inference_pb2

        label = inference_pb2.ClassifyResponse.FromString(message).labels[0]
        return Answer(label.index, label.probability)

    def answered(self) -> float:
        return _metric_sum(self._server.metrics_url, "cbam_requests_total", method="Classify", code="OK")

    def pids(self) -> list[int]:
        return [self._server.pid]

    def settings(self) -> dict:
        serving = self._server.serving
        keys = ("arch", "backend", "device", "dtype", "max_batch_size", "max_batch_delay_ms", "workers",
                "torch_threads", "torch_interop_threads")  # fmt: skip
        return {
            "command": "cbam-serve --checkpoint FILE (and loopback host/ports): its defaults",
            **{key: serving[key] for key in keys if key in serving},
        }


class _PeerProcess:
    """A peer's server in a process group of its own (so stopping it stops its children), logging to a file,
    started when `ready()` says so."""

    def __init__(
        self, command: list[str], *, env: dict[str, str], cwd: Path, ready: Callable[[], bool], timeout: float
    ) -> None:
        self.command, self.env, self.cwd, self.ready, self.timeout = command, env, cwd, ready, timeout
        self.log = cwd / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.timeout
        while not self._ready_or_stop():
            if self.process.poll() is not None or time.monotonic() > deadline:
                what = "exited" if self.process.returncode is not None else f"not ready in {self.timeout:g} s"
                self.stop()
                raise RuntimeError(f"{' '.join(self.command[:3])} ... {what}; its log ends:\n{self.tail()}")
            time.sleep(0.5)

    def _ready_or_stop(self) -> bool:
        try:
            return self.ready()
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is None:
            return
        for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(wait)
                _wait_group_gone(self.process.pid, wait)
                break
            except subprocess.TimeoutExpired:
                continue

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(collections.deque(self.log.read_text(errors="replace").splitlines(), lines))
        except OSError:
            return "(no log)"


class _FromVenv(Served):
    """A peer run from its own venv as a process group (`_PeerProcess`)."""

    _process: _PeerProcess

    def start(self) -> None:
        self._process.start()

    def stop(self) -> None:
        self._process.stop()

    def pids(self) -> list[int]:
        return [self._process.process.pid]


class PyTriton(_FromVenv):
    """Triton Inference Server through PyTriton, the model in our launcher's process, dynamic batching."""

    name = "triton"
    protocol = "Open Inference Protocol ModelInfer, a UINT8 [1, H, W, 3] tensor in raw_input_contents"
    method = "/inference.GRPCInferenceService/ModelInfer"
    model_name = "cbam_resnet50"

    def __init__(
        self,
        venv: Path,
        checkpoint: Path,
        pylib: Path,
        workdir: Path,
        *,
        max_batch_size: int,
        max_queue_delay_ms: float,
        startup_timeout: float = 600.0,
    ) -> None:
        self.venv, self.max_batch_size, self.max_queue_delay_ms = venv, max_batch_size, max_queue_delay_ms
        self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.target = f"127.0.0.1:{self.grpc_port}"
        python = venv / "bin" / "python"
        command = [
            str(python),
            str(LAUNCHERS / "pytriton_server.py"),
            str(checkpoint),
            f"--grpc-port={self.grpc_port}",
            f"--http-port={self.http_port}",
            f"--metrics-port={self.metrics_port}",
            f"--max-batch-size={max_batch_size}",
            f"--max-queue-delay-ms={max_queue_delay_ms:g}",
        ]
        # Its Python-backend stub links the interpreter's libpython, which lives in LIBDIR, off the path.
        libdir = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
            capture_output=True, text=True, check=True, timeout=120,
        ).stdout.strip()  # fmt: skip
        env = _peer_env(venv, pylib, LD_LIBRARY_PATH=libdir)
        workdir.mkdir(parents=True, exist_ok=True)
        ready = f"http://127.0.0.1:{self.http_port}/v2/models/{self.model_name}/ready"
        self._process = _PeerProcess(
            command, env=env, cwd=workdir, ready=lambda: _http_ok(ready), timeout=startup_timeout
        )

    def request(self, pixels: np.ndarray) -> bytes:
        return model_infer_request(
            self.model_name, "image", "UINT8", [1, *pixels.shape], pixels.tobytes(), ["index", "probability"]
        )

    def read_answer(self, message: bytes) -> Answer:
        fields = read_fields(message)
        names = [read_fields(tensor)[1][0].decode() for tensor in fields.get(5, [])]
        raw = dict(zip(names, fields.get(6, []), strict=True))
        return Answer(struct.unpack("<q", raw["index"])[0], struct.unpack("<f", raw["probability"])[0])

    def answered(self) -> float:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        return _metric_sum(url, "nv_inference_request_success", model=self.model_name)

    def settings(self) -> dict:
        return {
            "command": "our loadtest/peer_launchers/pytriton_server.py (Triton(...).bind(...).serve())",
            "max_batch_size": self.max_batch_size,
            "max_queue_delay_ms": self.max_queue_delay_ms,
            "instances": 1,
            "torch_threads": "torch's default",
            "packages": _versions(self.venv, "nvidia-pytriton", "torch"),
        }


class TorchServe(_FromVenv):
    """TorchServe with a .mar built here by torch-model-archiver (our handler, our models package, the
    checkpoint), its default worker count, batching set in the archive's model-config.yaml."""

    name = "torchserve"
    protocol = "TorchServe gRPC Predictions, input {'data': H x W x 3 uint8 bytes}"
    method = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions"
    model_name = "cbam"

    def __init__(
        self,
        venv: Path,
        checkpoint: Path,
        pylib: Path,
        workdir: Path,
        *,
        batch_size: int,
        max_batch_delay_ms: int,
        startup_timeout: float = 600.0,
    ) -> None:
        self.venv, self.checkpoint, self.pylib, self.workdir = venv, checkpoint, pylib, workdir
        self.batch_size, self.max_batch_delay_ms = batch_size, max_batch_delay_ms
        ports = {name: free_port() for name in ("inference", "management", "metrics", "grpc", "grpc_mgmt")}
        self.ports = ports
        self.target = f"127.0.0.1:{ports['grpc']}"
        self.store = workdir / "model-store"
        config = workdir / "config.properties"
        command = [
            str(venv / "bin" / "torchserve"),
            "--start",
            "--foreground",
            "--ncs",  # no config snapshots written
            f"--ts-config={config}",
            f"--model-store={self.store}",
        ]
        self._config_text = "\n".join(
            [
                f"inference_address=http://127.0.0.1:{ports['inference']}",
                f"management_address=http://127.0.0.1:{ports['management']}",
                f"metrics_address=http://127.0.0.1:{ports['metrics']}",
                "grpc_inference_address=127.0.0.1",
                f"grpc_inference_port={ports['grpc']}",
                "grpc_management_address=127.0.0.1",
                f"grpc_management_port={ports['grpc_mgmt']}",
                "disable_token_authorization=true",  # loopback only; cbam-serve runs without tokens too
                "disable_system_metrics=true",  # else a Python collector starts every minute, mid-window
                "metrics_mode=prometheus",  # its request counts on /metrics, as the others keep theirs
                f"model_store={self.store}",
                f"load_models={self.model_name}.mar",
                "",
            ]
        )
        self._config = config
        self._process = _PeerProcess(
            command, env=_peer_env(venv, pylib), cwd=workdir, ready=self._ready, timeout=startup_timeout
        )
        self._workers: list[dict] = []

    def start(self) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        self._config.write_text(self._config_text)
        model_config = self.workdir / "model-config.yaml"
        model_config.write_text(f"batchSize: {self.batch_size}\nmaxBatchDelay: {self.max_batch_delay_ms}\n")
        subprocess.run(
            [
                str(self.venv / "bin" / "torch-model-archiver"),
                f"--model-name={self.model_name}",
                "--version=1.0",
                f"--serialized-file={self.checkpoint}",
                f"--handler={LAUNCHERS / 'torchserve_handler.py'}",
                f"--extra-files={self.pylib}",  # its contents (our models package) beside the handler
                f"--config-file={model_config}",
                f"--export-path={self.store}",
                "--force",
            ],
            env=_peer_env(self.venv, self.pylib),
            check=True,
            capture_output=True,
            timeout=600,
        )
        super().start()

    def _ready(self) -> bool:
        # TorchServe restarts a worker that dies loading the model, for ever: say why at once instead.
        if "Backend worker process died" in self._process.log.read_text(errors="replace"):
            raise RuntimeError(
                f"a TorchServe worker died loading the model; its log ends:\n{self._process.tail(60)}"
            )
        url = f"http://127.0.0.1:{self.ports['management']}/models/{self.model_name}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                (model,) = json.loads(response.read())
        except (OSError, ValueError):
            return False
        self._workers = model.get("workers", [])
        self._description = model
        return (
            bool(self._workers)
            and all(w.get("status") == "READY" for w in self._workers)
            and (len(self._workers) >= model.get("minWorkers", 1))
        )

    def request(self, pixels: np.ndarray) -> bytes:
        return predictions_request(self.model_name, {"data": pixels.tobytes()})

    def read_answer(self, message: bytes) -> Answer:
        answer = json.loads(read_fields(message)[1][0])
        return Answer(int(answer["index"]), float(answer["probability"]))

    def answered(self) -> float:
        url = f"http://127.0.0.1:{self.ports['metrics']}/metrics"
        return _metric_sum(url, "ts_inference_requests_total", model_name=self.model_name)

    def settings(self) -> dict:
        description = getattr(self, "_description", {})
        return {
            "command": "torchserve --start --foreground --ncs (a .mar of our "
            "loadtest/peer_launchers/torchserve_handler.py)",
            "batch_size": self.batch_size,
            "max_batch_delay_ms": self.max_batch_delay_ms,
            "workers": len(self._workers),
            "workers_setting": "TorchServe's default (one per core)",
            "response_timeout_s": description.get("responseTimeout"),
            "torch_threads": "torch's default",
            "packages": _versions(self.venv, "torchserve", "torch"),
        }


def copy_models_package(destination: Path) -> Path:
    """Our `models` package (code only) under `destination`, for the peers' PYTHONPATH and .mar: the peers
    import the model code cbam-serve serves, not a copy of theirs nor our whole environment."""
    import models

    source = Path(models.__file__).parent
    shutil.copytree(source, destination / "models", ignore=shutil.ignore_patterns("__pycache__", "default"))
    return destination


def free_port() -> int:
    """A loopback port nothing listens on now (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _peer_env(venv: Path, pylib: Path, **extra: str) -> dict[str, str]:
    """This environment with the peer's venv first on PATH, our models package on PYTHONPATH, and none of
    our own venv's settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")}
    ours = Path(sys.prefix) / "bin"
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and Path(p) != ours]
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *path])
    env["PYTHONPATH"] = str(pylib)
    env["VIRTUAL_ENV"] = str(venv)
    for key, value in extra.items():
        env[key] = os.pathsep.join(filter(None, [value, env.get(key)]))
    return env


def _versions(venv: Path, *packages: str) -> dict[str, str]:
    script = (
        "import importlib.metadata as m, json, sys; "
        "print(json.dumps({p: m.version(p) for p in sys.argv[1:]}))"
    )
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", script, *packages], capture_output=True, text=True, timeout=120
    )
    return json.loads(done.stdout) if done.returncode == 0 else dict.fromkeys(packages, "unknown")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _metric_sum(url: str, name: str, **labels: str) -> float:
    """The sum of a counter's samples whose labels include `labels`. The parser names every counter sample
    `..._total`, whatever the server wrote (Triton's counters have no suffix)."""
    wanted = name.removesuffix("_total") + "_total"
    return sum(
        value
        for (sample, sample_labels), value in scrape(url).items()
        if sample == wanted and labels.items() <= dict(sample_labels).items()
    )


def _wait_group_gone(pgid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    raise subprocess.TimeoutExpired(f"process group {pgid}", timeout)
