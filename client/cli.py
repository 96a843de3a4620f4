"""cbam-client: classify images with a running cbam-serve, and ask what it serves and whether it is up.

    cbam-client classify PATH... [--top-k K] [--json] [--attention DIR [--blocks B,...] [--cmap NAME]
                                 [--figure-format png|svg]]
    cbam-client info [--json]
    cbam-client health [--service NAME]

Exit status: 0 all went well, 1 some images (or the call) failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ._channel import DEFAULT_TARGET, TlsConfig
from ._errors import CbamError
from ._figures import FIGURE_FORMATS, colormap, save_attention_pictures
from ._gallery import GalleryRow, write_gallery
from ._sync import Client
from ._types import ModelInfo, StreamResult

__all__ = ["main"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.tls_cert and not args.tls_key or args.tls_key and not args.tls_cert:
        parser.error("--tls-cert and --tls-key go together")
    if args.timeout <= 0:
        parser.error(f"--timeout should be > 0 seconds, got {args.timeout}")
    try:
        client = _client(args)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    with client:
        try:
            return args.run(client, args, parser)
        except CbamError as exc:
            Console(stderr=True).print(f"[red]error[/red] {exc.code.name}: {exc.message}", highlight=False)
            return EXIT_FAILED
        except BrokenPipeError:  # the reader went away (| head): stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_FAILED


def _parser() -> argparse.ArgumentParser:
    connection = argparse.ArgumentParser(add_help=False)
    group = connection.add_argument_group("connection")
    group.add_argument(
        "--target",
        default=os.environ.get("CBAM_TARGET", DEFAULT_TARGET),
        help="HOST:PORT, a gRPC URI (dns:///name:port), or comma-separated addresses to balance over "
        f"(default: $CBAM_TARGET or {DEFAULT_TARGET})",
    )
    group.add_argument("--tls-ca", metavar="PEM", help="turn on TLS, trusting this root CA")
    group.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS (with --tls-key)")
    group.add_argument("--tls-key", metavar="PEM", help="client private key for mutual TLS")
    group.add_argument("--tls-server-name", metavar="NAME", help="name to check in the server's certificate")
    group.add_argument(
        "--token",
        default=os.environ.get("CBAM_TOKEN"),
        help="bearer token sent as 'authorization: Bearer TOKEN' (default: $CBAM_TOKEN)",
    )
    group.add_argument(
        "--timeout", type=float, default=30.0, help="deadline of each call in seconds; a stream of N "
        "images gets N times that (default: 30)"
    )

    parser = argparse.ArgumentParser(prog="cbam-client", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    classify = commands.add_parser(
        "classify", parents=[connection], help="classify image files or folders of them",
        description="Classify images, sending them all over one stream.",
    )
    classify.add_argument(
        "paths", nargs="+", metavar="PATH", help="image files, or folders to search for images"
    )
    classify.add_argument("--top-k", type=int, default=5, metavar="K", help="labels per image (default: 5)")
    classify.add_argument("--json", action="store_true", help="one JSON object per image instead of a table")
    classify.add_argument(
        "--attention", metavar="DIR", type=Path,
        help="ask for the blocks' attention and write a figure per image under DIR/<image name>/, and "
        "DIR/index.html, a gallery of them all (needs matplotlib: the load extra)",
    )
    classify.add_argument(
        "--blocks", metavar="B,...", help="with --attention: only these blocks, comma-separated "
        "(default: every block; `cbam-client info` lists them)",
    )
    classify.add_argument(
        "--cmap", metavar="NAME", help="with --attention: matplotlib colour map of the spatial maps "
        "(default: viridis)",
    )
    classify.add_argument(
        "--figure-format", choices=FIGURE_FORMATS, help="with --attention: file format of each figure "
        "(default: png)",
    )
    classify.set_defaults(run=_classify)

    info = commands.add_parser("info", parents=[connection], help="what the server serves")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(run=_info)

    health = commands.add_parser("health", parents=[connection], help="whether the server is serving")
    health.add_argument("--service", default="", help="service name to check (default: the whole server)")
    health.set_defaults(run=_health)
    return parser


def _client(args: argparse.Namespace) -> Client:
    tls = None
    if args.tls_ca or args.tls_cert or args.tls_server_name:
        tls = TlsConfig.from_files(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    return Client(args.target, timeout=args.timeout, token=args.token, tls=tls)


def find_images(paths: Sequence[str | Path]) -> list[Path]:
    """The files named, plus the image files under each folder named (sorted). Raises FileNotFoundError."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            found.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {str(path)!r}")
    return found


def _classify(client: Client, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.top_k < 1:
        parser.error(f"--top-k should be >= 1, got {args.top_k}")
    try:
        paths = find_images(args.paths)
    except FileNotFoundError as exc:
        parser.error(str(exc))
    if not paths:
        parser.error(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {' '.join(args.paths)}")

    blocks = _check_attention_args(client, args, parser)

    out, err = Console(), Console(stderr=True)
    results: dict[int, StreamResult] = {}
    stream = client.classify_stream(
        paths,
        top_k=args.top_k,
        attention="both" if args.attention else None,
        attention_blocks=blocks,
        timeout=args.timeout * len(paths),
    )
    with _progress(err, total=len(paths)) as progress:
        task = progress.add_task("classifying", total=len(paths))
        for result in stream:
            path = paths[result.index]
            results[result.index] = result
            if args.json:
                print(json.dumps(_result_json(path, result)), flush=True)
            progress.advance(task)
        if args.attention:  # after the stream, so drawing does not delay reading answers (or their latency)
            gallery = _draw_attention(paths, results, args, progress, err)


    failed = [i for i in range(len(paths)) if not results[i].ok]
    if not args.json:
        out.print(_results_table(paths, results, args.top_k))
    if args.attention:
        err.print(f"attention figures and their gallery: {gallery}", highlight=False)
    if failed:
        err.print(f"[red]{len(failed)} of {len(paths)} images failed[/red]", highlight=False)
    return EXIT_FAILED if failed else EXIT_OK


def _check_attention_args(
    client: Client, args: argparse.Namespace, parser: argparse.ArgumentParser
) -> list[str] | None:
    """The blocks to ask for (None: all), after filling in the drawing options' defaults; exits with a
    usage error for options that cannot work (before anything is sent)."""
    if not args.attention:
        options = {"--blocks": args.blocks, "--cmap": args.cmap, "--figure-format": args.figure_format}
        given = [flag for flag, value in options.items() if value is not None]
        if given:
            parser.error(f"{', '.join(given)}: only with --attention DIR")
        return None
    args.cmap = args.cmap or "viridis"
    args.figure_format = args.figure_format or "png"
    try:
        colormap(args.cmap)
    except (ImportError, ValueError) as exc:  # no matplotlib (the error names the extra), or no such map
        parser.error(f"--attention: {exc}")
    if args.blocks is None:
        return None
    blocks = [b.strip() for b in args.blocks.split(",") if b.strip()]
    known = client.model_info().attention_blocks
    unknown = [b for b in blocks if b not in known]
    if unknown or not blocks:
        parser.error(f"--blocks: the model's attention blocks are {', '.join(known)}; got {args.blocks!r}")
    return blocks


def _progress(console: Console, total: int) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=total < 2 or not console.is_terminal,
    )


def _result_json(path: Path, result: StreamResult) -> dict:
    record: dict = {"path": str(path)}
    if result.error is not None:
        record["error"] = {"code": result.error.code.name, "message": result.error.message}
        return record
    prediction = result.prediction
    record.update(
        request_id=prediction.request_id,
        labels=[asdict(label) for label in prediction.labels],
        model_version=prediction.model_version,
        timings=asdict(prediction.timings),
        latency_seconds=round(result.latency_seconds, 6),
    )
    return record


def _results_table(paths: list[Path], results: dict[int, StreamResult], top_k: int) -> Table:
    table = Table(title=None, show_lines=False)
    table.add_column("image", overflow="fold")
    for rank in range(1, top_k + 1):
        table.add_column(f"#{rank}", no_wrap=True)
    table.add_column("ms", justify="right")
    for index, path in enumerate(paths):
        result = results[index]
        if result.error is not None:
            message = f"[red]{result.error.code.name}[/red]: {result.error.message}"
            table.add_row(str(path), message, *[""] * (top_k - 1), "")
            continue
        cells = [f"{label.name}  {label.probability:.3f}" for label in result.prediction.labels]
        cells += [""] * (top_k - len(cells))
        table.add_row(str(path), *cells, f"{result.latency_seconds * 1000:.1f}")
    return table


def _attention_folders(paths: list[Path], root: Path) -> list[Path]:
    """DIR/<image name> per image; a name seen before gets -2, -3, ... in input order."""
    seen: dict[str, int] = {}
    folders = []
    for path in paths:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        folders.append(root / (path.stem if seen[path.stem] == 1 else f"{path.stem}-{seen[path.stem]}"))
    return folders


def _draw_attention(
    paths: list[Path],
    results: dict[int, StreamResult],
    args: argparse.Namespace,
    progress: Progress,
    err: Console,
) -> Path:
    """A figure and small pictures per answered image under args.attention, then the gallery page."""
    folders = _attention_folders(paths, args.attention)
    task = progress.add_task("drawing attention", total=len(paths))
    rows = []
    for index, path in enumerate(paths):
        result = results[index]
        if result.error is not None:
            rows.append(GalleryRow(str(path), error=f"{result.error.code.name}: {result.error.message}"))
        else:
            rows.append(_draw_one(result, path, folders[index], args, err))
        progress.advance(task)
    return write_gallery(args.attention, rows, cmap=args.cmap)


def _draw_one(
    result: StreamResult, path: Path, folder: Path, args: argparse.Namespace, err: Console
) -> GalleryRow:
    try:
        pictures = save_attention_pictures(
            result.prediction, path, folder, cmap=args.cmap, figure_format=args.figure_format,
            title=path.name,
        )  # fmt: skip
    except (OSError, ValueError) as exc:  # unreadable here (the server may decode more formats), or no maps
        err.print(f"[yellow]no attention pictures for {path}[/yellow]: {exc}", highlight=False)
        return GalleryRow(str(path), result.prediction, error=str(exc))
    return GalleryRow(str(path), result.prediction, pictures)


def _info(client: Client, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    info = client.model_info()
    if args.json:
        print(json.dumps(asdict(info)))
        return EXIT_OK
    table = Table(show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    labels = ", ".join(info.labels[:20]) + (f", ... ({len(info.labels)})" if len(info.labels) > 20 else "")
    rows = {
        "target": client.target,
        "arch": info.arch,
        "version": info.version,
        "parameters": f"{info.num_parameters:,}",
        "input (H x W)": f"{info.input_size[0]} x {info.input_size[1]}",
        "device / dtype": f"{info.device} / {info.dtype}",
        "labels": labels,
        "attention blocks": ", ".join(info.attention_blocks),
        "batching": f"max_batch_size {info.batching.max_batch_size}, "
        f"max_batch_delay_ms {info.batching.max_batch_delay_ms:g}, max_queue {info.batching.max_queue}",
        "limits": f"max_image_pixels {info.max_image_pixels:,}, "
        f"max_message_bytes {info.max_message_bytes:,}, max_batch_items {info.max_batch_items}",
        "workers": _workers(info),
    }
    for key, value in rows.items():
        table.add_row(key, value)
    Console().print(table)
    return EXIT_OK


def _workers(info: ModelInfo) -> str:
    """"2, this answer from worker 1; pids 4101, 4102" (and any not ready or restarted)."""
    if not info.workers:
        return "not reported (a server from before workers)"
    notes = [f"{len(info.workers)}, this answer from worker {info.worker}"]
    notes.append("pids " + ", ".join(str(w.pid) if w.pid else "-" for w in info.workers))
    notes += [f"worker {w.index} not ready" for w in info.workers if not w.ready]
    notes += [f"worker {w.index} restarted {w.restarts}x" for w in info.workers if w.restarts]
    return "; ".join(notes)


def _health(client: Client, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    status = client.health(args.service)
    print(status)
    return EXIT_OK if status == "SERVING" else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
