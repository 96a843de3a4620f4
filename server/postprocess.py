"""Turn one request's row of a batch's output into what it asked for: top-k labels and attention maps.

Runs per request after its batch, so only the requests that asked for attention pay to encode it.
"""

from __future__ import annotations

import enum
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

__all__ = [
    "AttentionFormat",
    "AttentionKind",
    "AttentionQuery",
    "EncodedMap",
    "LabelScore",
    "encode_attention",
    "top_k_rows",
]


class AttentionKind(enum.IntEnum):
    """Which maps a request wants; values are the wire's AttentionKind numbers."""

    NONE = 0
    CHANNEL = 1
    SPATIAL = 2
    BOTH = 3

    @property
    def kinds(self) -> tuple[str, ...]:
        """The map kinds it covers, in response order."""
        return {0: (), 1: ("channel",), 2: ("spatial",), 3: ("channel", "spatial")}[self.value]


class AttentionFormat(enum.IntEnum):
    """How maps are encoded; values are the wire's AttentionFormat numbers."""

    FLOAT16 = 0
    PNG = 1


@dataclass(frozen=True)
class AttentionQuery:
    """The attention part of a request. ``blocks`` empty means every block."""

    kind: AttentionKind = AttentionKind.NONE
    blocks: tuple[str, ...] = ()
    format: AttentionFormat = AttentionFormat.FLOAT16

    @property
    def wanted(self) -> bool:
        return self.kind is not AttentionKind.NONE


@dataclass(frozen=True)
class LabelScore:
    index: int
    name: str
    probability: float


@dataclass(frozen=True)
class EncodedMap:
    """One attention map of one block, ready for the wire."""

    block: str
    kind: str  # "channel" or "spatial"
    shape: tuple[int, ...]
    format: AttentionFormat
    data: bytes


def top_k_rows(logits: torch.Tensor, labels: Sequence[str], ks: Sequence[int]) -> list[list[LabelScore]]:
    """Softmax and the most probable labels of every row of a B x classes batch, row i keeping its
    ``ks[i]`` best, most probable first.

    One softmax and one topk for the whole batch: per row, two torch calls cost more than the
    rest of a small request's postprocessing together.
    """
    probabilities = torch.softmax(logits.float(), dim=-1)
    values, indices = torch.topk(probabilities, max(ks))
    return [
        [LabelScore(index=i, name=labels[i], probability=p) for p, i in zip(ps[:k], ix[:k], strict=True)]
        for ps, ix, k in zip(values.tolist(), indices.tolist(), ks, strict=True)
    ]


def encode_attention(
    maps: Mapping[str, Mapping[str, torch.Tensor | None]], query: AttentionQuery
) -> list[EncodedMap]:
    """Encode the maps ``query`` asked for, by block in ``maps`` order, channel before spatial.

    ``maps`` holds one image's maps: block name -> {"channel": C, "spatial": H x W}; a kind a
    block does not have (None) is left out.
    """
    if not query.wanted:
        return []
    blocks = set(query.blocks)
    encoded = []
    for block, kinds in maps.items():
        if blocks and block not in blocks:
            continue
        for kind in query.kind.kinds:
            values = kinds.get(kind)
            if values is not None:
                encoded.append(_encode_map(block, kind, values, query.format))
    return encoded


def _encode_map(block: str, kind: str, values: torch.Tensor, fmt: AttentionFormat) -> EncodedMap:
    array = values.detach().float().cpu().numpy()
    if fmt is AttentionFormat.PNG:
        pixels = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels.reshape(1, -1) if pixels.ndim == 1 else pixels).save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        data = array.astype("<f2").tobytes()
    return EncodedMap(block=block, kind=kind, shape=tuple(array.shape), format=fmt, data=data)
