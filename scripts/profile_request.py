"""Where one request's time goes: each stage timed in-process, then the served stages under load.

    .venv/bin/python scripts/profile_request.py                       # the default model
    .venv/bin/python scripts/profile_request.py --arch cbam_resnet50  # 224 x 224, random weights
    .venv/bin/python scripts/profile_request.py --backend onnxruntime --json out/profile.json

Part 1 (in-process, median of --repeats runs, CPU time of this thread where it is single-threaded):
decode (PNG at the input size, a 640 x 480 JPEG with and without draft mode), resize + normalise
(the reference float32 path against uint8 pixels normalised in the batch), stacking a batch (the
old torch.stack of float tensors against the runner's fused assembly), the forward at batch 1 and at
--batch, softmax + top-k, attention serialisation (every block, float16 and PNG) and protobuf encoding.

Part 2 (served): a fresh cbam-serve on 127.0.0.1, loaded at concurrency 1 and at --saturation with
uint8 tensors as cbam-bench sends them; the server's own stage histograms (preprocess, queue,
inference per batch, postprocess) read from /metrics at the window's edges, and what is left of the
client's latency (gRPC, protobuf, asyncio on both sides).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "proto")]

from loadtest._served import drive_load  # noqa: E402
from server.assembly import BatchAssembler  # noqa: E402
from server.backends import AUTO, backend_choices  # noqa: E402
from server.config import ModelSettings  # noqa: E402
from server.launcher import ServerProcess, scrape  # noqa: E402
from server.pipeline import Prediction, Timings  # noqa: E402
from server.postprocess import AttentionFormat, AttentionKind, AttentionQuery, encode_attention  # noqa: E402
from server.preprocess import ImageSpec, RawTensor, decode_image, load_pixels  # noqa: E402
from server.runner import BatchItem, ModelRunner  # noqa: E402
from server.service import to_response  # noqa: E402
from server.tuning import configure_torch_threads  # noqa: E402
from tests.reference import preprocess, top_k  # noqa: E402  (the plain float32 path, for comparison)


def timed(fn, repeats: int, clock=time.perf_counter) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs, after two warm-up runs."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times) * 1e3


def in_process(args: argparse.Namespace) -> dict[str, float]:
    configure_torch_threads()
    settings = (
        ModelSettings(arch=args.arch, backend=args.backend)
        if args.arch
        else ModelSettings(backend=args.backend)
    )
    runner = ModelRunner.from_settings(settings, max_batch_size=max(args.batch, 1))
    runner.warm_up([1, args.batch])
    d = runner.description
    spec = ImageSpec(d.input_size, d.mean, d.std, 40_000_000)
    height, width = d.input_size
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    png = _encode(Image.fromarray(pixels), "PNG")
    photo = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).resize((640, 480))
    jpeg = _encode(photo, "JPEG", quality=90)
    raw = RawTensor("uint8", (height, width, 3), pixels.tobytes())
    thread = time.thread_time
    r: dict[str, float] = {}
    r["decode PNG at input size"] = timed(lambda: decode_image(png, spec.max_pixels), args.repeats, thread)
    r["decode 640x480 JPEG, full"] = timed(lambda: decode_image(jpeg, spec.max_pixels), args.repeats, thread)
    r["decode 640x480 JPEG, draft"] = timed(
        lambda: decode_image(jpeg, spec.max_pixels, draft_size=(width, height)), args.repeats, thread
    )
    r["JPEG to input: reference preprocess (float32)"] = timed(
        lambda: preprocess(jpeg, spec), args.repeats, thread
    )
    r["JPEG to input: load_pixels (draft, uint8)"] = timed(
        lambda: load_pixels(jpeg, spec), args.repeats, thread
    )
    r["uint8 tensor: reference preprocess (float32)"] = timed(
        lambda: preprocess(raw, spec), args.repeats, thread
    )
    r["uint8 tensor: load_pixels (uint8)"] = timed(lambda: load_pixels(raw, spec), args.repeats, thread)
    floats = [preprocess(raw, spec) for _ in range(args.batch)]
    items = [BatchItem(load_pixels(raw, spec)) for _ in range(args.batch)]
    assembler = BatchAssembler(d.input_size, d.mean, d.std, rows=args.batch)  # as the runner's, on the CPU
    with torch.inference_mode():
        r[f"batch of {args.batch}: torch.stack of float32 + channels-last copy"] = timed(
            lambda: torch.stack(floats).contiguous(memory_format=torch.channels_last), args.repeats
        )
        r[f"batch of {args.batch}: fused normalise into the preallocated batch"] = timed(
            lambda: assembler.assemble([item.tensor for item in items]), args.repeats
        )
    r[f"run_batch, batch 1 ({d.backend})"] = timed(lambda: runner.run_batch(items[:1]), args.repeats)
    r[f"run_batch, batch {args.batch} ({d.backend})"] = timed(lambda: runner.run_batch(items), args.repeats)
    every = frozenset(d.attention_blocks)
    (output,) = runner.run_batch([BatchItem(items[0].tensor, every)])
    r["softmax + top-5"] = timed(lambda: top_k(output.logits, d.labels, 5), args.repeats, thread)
    for fmt in (AttentionFormat.FLOAT16, AttentionFormat.PNG):
        query = AttentionQuery(AttentionKind.BOTH, (), fmt)
        r[f"attention, every block, {fmt.name}"] = timed(
            lambda q=query: encode_attention(output.maps, q), args.repeats, thread
        )
    maps = encode_attention(output.maps, AttentionQuery(AttentionKind.BOTH, (), AttentionFormat.FLOAT16))
    for label, chosen in (("no maps", []), ("every map, FLOAT16", maps)):
        prediction = Prediction(
            "id", top_k(output.logits, d.labels, 5), chosen, d.version, Timings(0, 0, 0, 0, 1)
        )
        r[f"protobuf: build + serialise ClassifyResponse, {label}"] = timed(
            lambda p=prediction: to_response(p).SerializeToString(), args.repeats, thread
        )
    return r


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _stages(url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of each stage's duration histogram."""
    samples = scrape(url)
    counts = [labels for name, labels in samples if name == "cbam_stage_duration_seconds_count"]
    stages = {dict(labels)["stage"] for labels in counts}
    return {
        stage: (
            samples.value("cbam_stage_duration_seconds_sum", stage=stage),
            samples.value("cbam_stage_duration_seconds_count", stage=stage),
        )
        for stage in stages
    }


async def _window(target: str, url: str, image: np.ndarray, concurrency: int, seconds: float) -> dict:
    # Warm up first, then read the histograms at the measured window's edges (not around the warm-up).
    await drive_load(target, image, concurrency=concurrency, seconds=1.0, warmup_seconds=0.0)
    before = _stages(url)
    result = await drive_load(target, image, concurrency=concurrency, seconds=seconds, warmup_seconds=0.0)
    after = _stages(url)
    summary = result.summary()
    means = {}
    for stage, (total, count) in after.items():
        done = count - before.get(stage, (0, 0))[1]
        if done:
            means[stage] = (total - before.get(stage, (0, 0))[0]) / done * 1e3
    # Per request: inference is timed once per batch, and each request waits for its whole batch.
    server = sum(means.get(s, 0.0) for s in ("preprocess", "queue", "inference", "postprocess"))
    return {
        "concurrency": concurrency,
        "throughput": summary["throughput"],
        "p50_ms": summary["p50"],
        "mean_batch_size": summary["mean_batch_size"],
        "client_mean_ms": float(np.mean(result.latencies)) * 1e3 if result.latencies else None,
        "stage_mean_ms": means,
        "outside_stages_ms": (float(np.mean(result.latencies)) * 1e3 - server) if result.latencies else None,
    }


def served(args: argparse.Namespace) -> list[dict]:
    flags = ["--model.backend", args.backend] + (["--arch", args.arch] if args.arch else [])
    with ServerProcess(*flags) as server:
        import client

        with client.Client(server.address, timeout=30) as c:
            height, width = c.model_info().input_size
        image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        return [
            asyncio.run(_window(server.address, server.metrics_url, image, c, args.seconds))
            for c in (1, args.saturation)
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch", help="a registered architecture (random weights); default: the default model"
    )
    parser.add_argument("--backend", default=AUTO, choices=backend_choices())
    parser.add_argument("--batch", type=int, default=8, help="the batch size of the batched stages")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--saturation", type=int, default=32, help="concurrency of the saturated window")
    parser.add_argument("--seconds", type=float, default=5.0, help="each served window")
    parser.add_argument("--no-served", action="store_true", help="only the in-process part")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = {"arch": args.arch or "default", "backend": args.backend, "load_average": os.getloadavg()[0]}
    report["in_process_ms"] = in_process(args)
    for name, ms in report["in_process_ms"].items():
        print(f"{ms:10.3f} ms  {name}")
    if not args.no_served:
        report["served"] = served(args)
        for window in report["served"]:
            stages = ", ".join(f"{k} {v:.3f}" for k, v in window["stage_mean_ms"].items())
            print(
                f"c={window['concurrency']}: {window['throughput']:.1f}/s p50 {window['p50_ms']:.2f} ms, "
                f"mean batch {window['mean_batch_size']:.2f}; server stages (ms): {stages}; outside the "
                f"stages (gRPC, protobuf, asyncio) {window['outside_stages_ms']:.3f} ms"
            )
    report["load_average_end"] = os.getloadavg()[0]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
