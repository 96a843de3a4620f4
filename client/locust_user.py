"""A Locust user that drives cbam-serve over gRPC and reports every call to Locust's statistics.

Import it from a locustfile (loadtest/locustfile.py does). It needs the `load` extra (locust). Settings,
beside Locust's own --host (HOST:PORT, grpc:// optional):

    --cbam-images PATH       a folder of images or a glob (default: the default model's sample PNGs)
    --cbam-attention-share   share of requests that ask for every block's attention, 0..1 (default 0)
    --cbam-stream-share      share of tasks that send a ClassifyStream instead of one Classify, 0..1
    --cbam-stream-size N     images per stream (default 8)
    --cbam-batch-share       share of tasks that send one ClassifyBatch call instead, 0..1 (default 0)
    --cbam-batch-size N      images per ClassifyBatch call (default 8)
    --cbam-top-k K, --cbam-timeout SECONDS, --cbam-token TOKEN, --cbam-tls-ca PEM
    --cbam-requests N        stop the run once N requests were recorded (default 0: only --run-time
                             stops it); a run bounded by work done, however fast the machine is
    (or the environment: CBAM_LOCUST_IMAGES, CBAM_LOCUST_ATTENTION_SHARE, ...)

Each Classify is one Locust request named "Classify" (or "Classify+attention"); each image of a stream is
one request named "ClassifyStream item", timed from when gRPC took it to when its answer came; each image
of a ClassifyBatch call one request named "ClassifyBatch item", timed by its call.
"""

from __future__ import annotations

import glob
import random
import time
from pathlib import Path

# Locust has patched the standard library with gevent on import; gRPC must be told before any channel.
from locust import User, events, task  # isort: skip
import grpc.experimental.gevent as grpc_gevent  # isort: skip
import gevent  # isort: skip
from locust.runners import WorkerRunner  # isort: skip
from locust.stats import CSV_STATS_INTERVAL_SEC  # isort: skip

grpc_gevent.init_gevent()

import grpc  # noqa: E402

from cbam.v1 import inference_pb2  # noqa: E402

from ._base import RequestOptions  # noqa: E402
from ._channel import TlsConfig  # noqa: E402
from ._errors import CbamError, error_from_rpc, item_error  # noqa: E402
from ._retry import RetryPolicy  # noqa: E402
from ._sync import Client  # noqa: E402

__all__ = ["CbamGrpcUser", "default_images_dir", "find_images"]


def default_images_dir() -> Path:
    """The default model's sample PNGs, found next to this package (in the repository or site-packages)."""
    return Path(__file__).resolve().parents[1] / "models" / "default" / "samples"


def find_images(spec: str | Path | None) -> list[Path]:
    """The image files a folder holds, or a glob matches. Raises ValueError when there are none."""
    spec = str(spec) if spec else str(default_images_dir())
    if Path(spec).is_dir():
        paths = sorted(p for p in Path(spec).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    else:
        paths = sorted(Path(p) for p in glob.glob(spec))
    if not paths:
        raise ValueError(f"--cbam-images: no images in {spec!r}")
    return paths


# (flag, type, default, help); each can also be set by the environment variable CBAM_LOCUST_<NAME>.
_ARGUMENTS = [
    ("--cbam-images", str, "", "Folder or glob of images to send (default: the sample PNGs)"),
    ("--cbam-attention-share", float, 0.0, "Share of requests asking for every block's attention, 0..1"),
    ("--cbam-stream-share", float, 0.0, "Share of tasks sending a ClassifyStream, not a Classify, 0..1"),
    ("--cbam-stream-size", int, 8, "Images per ClassifyStream call"),
    ("--cbam-batch-share", float, 0.0, "Share of tasks sending one ClassifyBatch call, 0..1"),
    ("--cbam-batch-size", int, 8, "Images per ClassifyBatch call"),
    ("--cbam-top-k", int, 5, "Labels asked for"),
    ("--cbam-timeout", float, 10.0, "Deadline of each call, in seconds"),
    ("--cbam-token", str, "", "Bearer token, if the server asks for one"),
    ("--cbam-tls-ca", str, "", "Root CA (PEM) to turn on TLS"),
    ("--cbam-requests", int, 0, "Stop the run once this many requests were recorded (0: no limit)"),
]


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    group = parser.add_argument_group("cbam-serve")
    for flag, kind, default, text in _ARGUMENTS:
        env_var = "CBAM_LOCUST_" + flag.removeprefix("--cbam-").replace("-", "_").upper()
        group.add_argument(flag, type=kind, default=default, env_var=env_var, help=text)


@events.test_start.add_listener
def _stop_after_requests(environment, **_kwargs) -> None:
    """With --cbam-requests N, end the run (as --run-time would) once N requests are in the statistics.
    The master counts for its workers: their reports reach it every few seconds."""
    options = environment.parsed_options
    limit = getattr(options, "cbam_requests", 0) if options is not None else 0
    if limit < 0:
        raise ValueError(f"--cbam-requests should be >= 0, got {limit}")
    if limit == 0 or isinstance(environment.runner, WorkerRunner):
        return

    def stop_when_done() -> None:
        while environment.runner.stats.total.num_requests < limit:
            gevent.sleep(0.1)
        if not options.headless:
            environment.runner.stop()
            return
        # Locust rewrites its --csv statistics every CSV_STATS_INTERVAL_SEC, not at exit: let it write
        # them once more, with the N requests in, before quitting.
        gevent.sleep(2 * CSV_STATS_INTERVAL_SEC)
        environment.runner.quit()

    gevent.spawn(stop_when_done)


class CbamGrpcUser(User):
    """Sends the configured images by Classify, ClassifyStream or ClassifyBatch, as fast as wait_time lets."""

    abstract = True
    host = "localhost:50051"

    def on_start(self) -> None:
        options = self.environment.parsed_options
        for name in ("cbam_attention_share", "cbam_stream_share", "cbam_batch_share"):
            share = getattr(options, name)
            if not 0 <= share <= 1:
                raise ValueError(f"--{name.replace('_', '-')} should be in 0..1, got {share}")
        if options.cbam_stream_share + options.cbam_batch_share > 1:
            raise ValueError("--cbam-stream-share and --cbam-batch-share should add up to at most 1")
        self.images = [path.read_bytes() for path in find_images(options.cbam_images)]
        self.attention_share = options.cbam_attention_share
        self.stream_share = options.cbam_stream_share
        self.stream_size = max(1, options.cbam_stream_size)
        self.batch_share = options.cbam_batch_share
        self.batch_size = max(1, options.cbam_batch_size)
        self.top_k = options.cbam_top_k
        self.timeout = options.cbam_timeout
        target = (self.host or CbamGrpcUser.host).removeprefix("grpc://").rstrip("/")
        tls = TlsConfig.from_files(options.cbam_tls_ca) if options.cbam_tls_ca else None
        # No client retries: a load test should count every failure, not hide it.
        self.client = Client(
            target, retry=RetryPolicy.none(), token=options.cbam_token or None, tls=tls, timeout=self.timeout
        )
        self.rng = random.Random()

    def on_stop(self) -> None:
        self.client.close()

    @task
    def classify(self) -> None:
        draw = self.rng.random()
        if draw < self.stream_share:
            self._stream()
        elif draw < self.stream_share + self.batch_share:
            self._batch()
        else:
            self._unary()

    def _options(self) -> RequestOptions:
        attention = "both" if self.rng.random() < self.attention_share else None
        return RequestOptions(top_k=self.top_k, attention=attention)

    def _unary(self) -> None:
        options = self._options()
        request = options.build(self.rng.choice(self.images))
        name = "Classify+attention" if options.attention else "Classify"
        started = time.perf_counter()
        response, exception = None, None
        try:
            response = self.client._stub.Classify(
                request, timeout=self.timeout, metadata=self.client._call_metadata()
            )
        except grpc.RpcError as exc:
            exception = error_from_rpc(exc)
        self._fire(name, started, response.ByteSize() if response is not None else 0, exception)

    def _batch(self) -> None:
        items = [self._options().build(self.rng.choice(self.images)) for _ in range(self.batch_size)]
        started = time.perf_counter()
        try:
            response = self.client._stub.ClassifyBatch(
                inference_pb2.ClassifyBatchRequest(items=items),
                timeout=self.timeout,
                metadata=self.client._call_metadata(),
            )
        except grpc.RpcError as exc:
            error = error_from_rpc(exc)
            for _ in items:  # the call failed: so did each of its images
                self._fire("ClassifyBatch item", started, 0, error)
            return
        for item in response.results:
            self._fire("ClassifyBatch item", started, item.ByteSize(), item_error(item))

    def _stream(self) -> None:
        requests = {}
        for i in range(self.stream_size):
            requests[str(i)] = self._options().build(self.rng.choice(self.images), request_id=str(i))
        sent_at: dict[str, float] = {}

        def send():
            for request_id, request in list(requests.items()):
                sent_at[request_id] = time.perf_counter()
                yield request

        stream_started = time.perf_counter()
        metadata = self.client._call_metadata()
        call = self.client._stub.ClassifyStream(send(), timeout=self.timeout, metadata=metadata)
        try:
            for item in call:
                if requests.pop(item.request_id, None) is None:
                    continue
                self._fire("ClassifyStream item", sent_at[item.request_id], item.ByteSize(), item_error(item))
        except grpc.RpcError as exc:
            error = error_from_rpc(exc)
            for request_id in requests:  # every image the broken stream did not answer failed
                self._fire("ClassifyStream item", sent_at.get(request_id, stream_started), 0, error)

    def _fire(self, name: str, started: float, length: int, exception: CbamError | None) -> None:
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=exception,
            context={},
        )
