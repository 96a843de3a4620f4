"""``cbam-models``: list the zoo, convert the authors' checkpoints, train and evaluate the default model.

cbam-models list [--json]
cbam-models convert --arch NAME SRC DST [--labels FILE] [--version V]
cbam-models train-default [--epochs N] [--seed S] [--checkpoint P] [--samples-dir D]
cbam-models evaluate [--checkpoint P] [--seed S] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ._default import DEFAULT_CHECKPOINT, SAMPLES_DIR
from .checkpoint import CheckpointError, convert_official_checkpoint
from .registry import create_model, default_input_size, list_models

__all__ = ["main", "describe_models"]


def describe_models() -> list[dict]:
    """Every registered model with its parameter count and multiply-adds for one image at its default
    input size (FlopCounterMode's FLOPs / 2), 1000 classes. Built on the meta device: no weights."""
    entries = []
    for name in list_models():
        height, width = default_input_size(name)
        with torch.device("meta"):
            model = create_model(name).eval()
            x = torch.empty(1, 3, height, width)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
        entries.append(
            {
                "name": name,
                "params": sum(p.numel() for p in model.parameters()),
                "macs": counter.get_total_flops() // 2,
                "input_size": [height, width],
                "attention_blocks": len(model.attention_blocks),
            }
        )
    return entries


def _list(args: argparse.Namespace) -> int:
    entries = describe_models()
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="cbam-models (1000 classes; MACs for one image)")
    for column in ("name", "params", "MACs", "input", "CBAM blocks"):
        table.add_column(column, justify="left" if column == "name" else "right")
    for e in entries:
        table.add_row(
            e["name"],
            f"{e['params']:,} ({e['params'] / 1e6:.2f}M)",
            f"{e['macs'] / 1e9:.3f} G",
            "x".join(map(str, e["input_size"])),
            str(e["attention_blocks"]),
        )
    Console().print(table)
    return 0


def _read_labels(path: Path) -> list[str]:
    """A JSON list, or one label per line (blank lines skipped)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        labels = json.loads(text)
        if not isinstance(labels, list):
            raise CheckpointError(f"{path} should hold a JSON list of labels, got {type(labels).__name__}")
        return [str(label) for label in labels]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _convert(args: argparse.Namespace) -> int:
    labels = _read_labels(args.labels) if args.labels else None
    meta = convert_official_checkpoint(args.src, args.dst, args.arch, labels=labels, version=args.version)
    print(f"wrote {args.dst}: {meta.arch}, {meta.num_classes} classes, version {meta.version!r}")
    return 0


def _train_default(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train_default

    config = TrainConfig(seed=args.seed, epochs=args.epochs)
    samples = None if args.no_samples else args.samples_dir
    result = train_default(args.checkpoint, samples, config)
    print(
        f"wrote {args.checkpoint}; held-out accuracy {result['accuracy']:.2%} "
        f"({result['correct']}/{result['total']})"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .train import evaluate

    result = evaluate(args.checkpoint, seed=args.seed)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['arch']} {result['version']!r}: held-out accuracy {result['accuracy']:.2%} "
            f"({result['correct']}/{result['total']}, seed {result['seed']})"
        )
    return 0


def _parser() -> argparse.ArgumentParser:
    from .train import SEED, TrainConfig

    parser = argparse.ArgumentParser(prog="cbam-models", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("list", help="every registered architecture, its parameters and MACs")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_list)

    p = commands.add_parser("convert", help="convert an authors' CBAM checkpoint (.pth/.pth.tar) to ours")
    p.add_argument("--arch", required=True, choices=list_models(), metavar="NAME", help="e.g. cbam_resnet50")
    p.add_argument("src", type=Path, help="the authors' checkpoint")
    p.add_argument("dst", type=Path, help="where to write ours (.safetensors)")
    p.add_argument("--labels", type=Path, help="class labels: one per line, or a JSON list")
    p.add_argument("--version", default="official", help="version string stored in the checkpoint")
    p.set_defaults(run=_convert)

    p = commands.add_parser("train-default", help="train the default digits model (needs scikit-learn)")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--seed", type=int, default=SEED, help="fixes the split, the init and the batches")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--samples-dir", type=Path, default=SAMPLES_DIR)
    p.add_argument("--no-samples", action="store_true", help="do not (re)write the sample images")
    p.set_defaults(run=_train_default)

    p = commands.add_parser("evaluate", help="held-out accuracy of a digits checkpoint")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--seed", type=int, default=SEED, help="the seed the held-out split was made with")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except (CheckpointError, OSError) as exc:
        print(f"cbam-models {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
