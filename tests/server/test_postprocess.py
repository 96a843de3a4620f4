"""postprocess: top-k from logits, and only the attention maps a request asked for, encoded as asked."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from server.postprocess import (
    AttentionFormat,
    AttentionKind,
    AttentionQuery,
    encode_attention,
    top_k_rows,
)
from tests.reference import top_k

LABELS = ["zero", "one", "two", "three"]


def test_top_k_is_sorted_softmax() -> None:
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    scores = top_k(logits, LABELS, 3)
    assert [s.index for s in scores] == [1, 3, 2]
    assert [s.name for s in scores] == ["one", "three", "two"]
    expected = torch.softmax(logits, 0)
    assert scores[0].probability == pytest.approx(float(expected[1]))
    assert sum(s.probability for s in top_k(logits, LABELS, 4)) == pytest.approx(1.0)


def test_top_k_rows_gives_each_row_its_own_k() -> None:
    """The batch form (one softmax and topk for the batch) equals top_k row by row."""
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    ks = [1, 4, 2, 3, 1]
    rows = top_k_rows(logits, LABELS, ks)
    assert [len(r) for r in rows] == ks
    for row, k, got in zip(logits, ks, rows, strict=True):
        assert got == top_k(row, LABELS, k)
        assert [s.index for s in got] == torch.argsort(row, descending=True)[:k].tolist()


def _maps() -> dict[str, dict[str, torch.Tensor | None]]:
    return {
        "layer1.0": {"channel": torch.linspace(0, 1, 16), "spatial": torch.rand(8, 8)},
        "layer2.0": {"channel": torch.rand(32), "spatial": None},  # a channel-only CBAM
        "layer3.0": {"channel": torch.rand(64), "spatial": torch.rand(2, 2)},
    }


def test_none_asks_for_nothing() -> None:
    assert encode_attention(_maps(), AttentionQuery()) == []


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (AttentionKind.CHANNEL, [("layer1.0", "channel"), ("layer2.0", "channel"), ("layer3.0", "channel")]),
        (AttentionKind.SPATIAL, [("layer1.0", "spatial"), ("layer3.0", "spatial")]),
        (
            AttentionKind.BOTH,
            [("layer1.0", "channel"), ("layer1.0", "spatial"), ("layer2.0", "channel"),
             ("layer3.0", "channel"), ("layer3.0", "spatial")],
        ),
    ],
)  # fmt: skip
def test_kinds_in_network_order_channel_first(kind: AttentionKind, expected: list[tuple[str, str]]) -> None:
    maps = encode_attention(_maps(), AttentionQuery(kind=kind))
    assert [(m.block, m.kind) for m in maps] == expected


def test_only_the_blocks_asked_for() -> None:
    maps = encode_attention(_maps(), AttentionQuery(kind=AttentionKind.BOTH, blocks=("layer3.0",)))
    assert [(m.block, m.kind, m.shape) for m in maps] == [
        ("layer3.0", "channel", (64,)),
        ("layer3.0", "spatial", (2, 2)),
    ]


def test_float16_round_trip() -> None:
    source = _maps()
    (spatial,) = encode_attention(source, AttentionQuery(kind=AttentionKind.SPATIAL, blocks=("layer1.0",)))
    assert spatial.format is AttentionFormat.FLOAT16 and spatial.shape == (8, 8)
    values = np.frombuffer(spatial.data, dtype="<f2").reshape(spatial.shape)
    np.testing.assert_allclose(values, source["layer1.0"]["spatial"].numpy(), atol=1e-3)


def test_png_heatmaps() -> None:
    query = AttentionQuery(kind=AttentionKind.BOTH, blocks=("layer1.0",), format=AttentionFormat.PNG)
    channel, spatial = encode_attention(_maps(), query)
    channel_image = Image.open(io.BytesIO(channel.data))
    assert channel_image.format == "PNG" and channel_image.mode == "L" and channel_image.size == (16, 1)
    assert channel.shape == (16,)
    pixels = np.asarray(channel_image)[0]
    assert pixels[0] == 0 and pixels[-1] == 255  # linspace(0, 1) spans the whole 8-bit range
    assert Image.open(io.BytesIO(spatial.data)).size == (8, 8)
