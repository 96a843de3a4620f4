"""index.html of `cbam-client classify ... --attention OUT`: one self-contained page, a row per image
(thumbnail, top-k, the spatial map of each block on the input, a link to the full figure), sortable by
confidence and filterable by predicted label. It loads nothing from the network: its style and script
are inline and its images are files beside it, referenced relatively, so it opens from disk."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template
from urllib.parse import quote

from ._figures import AttentionPictures
from ._types import Prediction

__all__ = ["GalleryRow", "write_gallery"]


@dataclass(frozen=True)
class GalleryRow:
    """One image of the gallery: its prediction and pictures, or why it has none."""

    name: str
    prediction: Prediction | None = None
    pictures: AttentionPictures | None = None
    error: str = ""


def write_gallery(folder: Path, rows: Sequence[GalleryRow], *, cmap: str = "viridis") -> Path:
    """Write folder/index.html for `rows` (input order); return its path. The pictures must lie in
    `folder` or below it."""
    blocks: list[str] = []
    for row in rows:
        if row.pictures is not None:
            blocks += [b for b in row.pictures.overlays if b not in blocks]
    labels = sorted({row.prediction.top.name for row in rows if row.prediction is not None})
    options = [f'<option data-kind="label" value="{_attr(name)}">{_text(name)}</option>' for name in labels]
    if any(row.prediction is None for row in rows):
        options.append('<option data-kind="failed">failed</option>')
    page = _PAGE.substitute(
        count=len(rows),
        cmap=html.escape(cmap),
        options="".join(options),
        headers="".join(f"<th>{_text(block)}</th>" for block in blocks),
        rows="\n".join(_row(index, row, blocks, folder) for index, row in enumerate(rows)),
    )
    path = folder / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def _row(index: int, row: GalleryRow, blocks: list[str], folder: Path) -> str:
    name = _text(row.name)
    if row.prediction is None:
        attributes = f'data-index="{index}" data-failed="1" data-confidence="-1" data-label=""'
        message = f'<td colspan="{len(blocks) + 2}" class="error">{_text(row.error)}</td>'
        return f'<tr {attributes}><td><div class="name">{name}</div></td>{message}</tr>'
    top = row.prediction.top
    attributes = f'data-index="{index}" data-failed="0" data-confidence="{top.probability:.6f}"'
    attributes += f' data-label="{_attr(top.name)}"'
    top_k = "".join(
        f"<li>{_text(each.name)} <span>{each.probability:.3f}</span></li>" for each in row.prediction.labels
    )
    pictures = row.pictures
    if pictures is None:
        cells = f'<td colspan="{len(blocks) + 1}" class="error">no pictures: {_text(row.error)}</td>'
        top_k_cell = f'<td><ol class="top-k">{top_k}</ol></td>'
        return f'<tr {attributes}><td><div class="name">{name}</div></td>{top_k_cell}{cells}</tr>'
    low, high = pictures.value_range
    thumbnail = f'<img class="thumb" src="{_href(pictures.thumbnail, folder)}" alt="{_attr(row.name)}">'
    overlays = "".join(
        f'<td><img src="{_href(pictures.overlays[b], folder)}" alt="{_attr(b)} on {_attr(row.name)}"></td>'
        if b in pictures.overlays
        else "<td></td>"
        for b in blocks
    )
    figure = f'<a href="{_href(pictures.figure, folder)}">figure</a>'
    return (
        f'<tr {attributes}><td>{thumbnail}<div class="name">{name}</div></td>'
        f'<td><ol class="top-k">{top_k}</ol><small>maps {low:.3f} to {high:.3f}</small></td>'
        f"{overlays}<td>{figure}</td></tr>"
    )


def _href(path: Path, folder: Path) -> str:
    return quote(path.relative_to(folder).as_posix())


def _text(value: str) -> str:
    return html.escape(value, quote=False)


def _attr(value: str) -> str:
    return html.escape(value, quote=True)


_PAGE = Template("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Attention of $count images</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
  .controls { display: flex; gap: 2em; align-items: center; margin: 1em 0; }
  table { border-collapse: collapse; }
  th, td { border-bottom: 1px solid #ddd; padding: 6px 10px; vertical-align: top; text-align: left; }
  th { position: sticky; top: 0; background: #fff; }
  img { height: 96px; image-rendering: pixelated; display: block; }
  .top-k { margin: 0; padding-left: 1.4em; }
  .top-k li:first-child { font-weight: bold; }
  .top-k span { color: #555; font-variant-numeric: tabular-nums; }
  small { color: #666; }
  .name { max-width: 140px; overflow-wrap: anywhere; font-size: 12px; color: #444; }
  .error { color: #a00; }
</style>
</head>
<body>
<h1>Attention of $count images</h1>
<p>Each block's spatial attention, upscaled to the image and blended on it ($cmap colour map; one scale
per image, its range under the labels). The figure has the maps alone, the channel weights and a
colour bar.</p>
<div class="controls">
  <label>Sort by <select id="sort">
    <option value="confidence-desc">confidence, highest first</option>
    <option value="confidence-asc">confidence, lowest first</option>
    <option value="input">input order</option>
  </select></label>
  <label>Predicted label <select id="label">
    <option data-kind="all">all</option>$options
  </select></label>
  <span id="shown"></span>
</div>
<table id="gallery">
<thead><tr><th>image</th><th>top-k</th>$headers<th></th></tr></thead>
<tbody>
$rows
</tbody>
</table>
<script>
"use strict";
const body = document.querySelector("#gallery tbody");
const rows = Array.from(body.rows);
const sort = document.getElementById("sort");
const label = document.getElementById("label");

function wanted(row, choice) {
  if (choice.dataset.kind === "all") return true;
  if (choice.dataset.kind === "failed") return row.dataset.failed === "1";
  return row.dataset.failed === "0" && row.dataset.label === choice.value;
}

function update() {
  const sign = sort.value === "confidence-asc" ? 1 : -1;
  const byInput = (a, b) => a.dataset.index - b.dataset.index;
  const byConfidence = (a, b) => sign * (a.dataset.confidence - b.dataset.confidence);
  const ordered = rows.slice().sort((a, b) => sort.value === "input" ? byInput(a, b)
    : (a.dataset.failed - b.dataset.failed) || byConfidence(a, b) || byInput(a, b));  // failed rows last
  const choice = label.selectedOptions[0];
  let shown = 0;
  for (const row of ordered) {
    row.hidden = !wanted(row, choice);
    shown += row.hidden ? 0 : 1;
    body.appendChild(row);
  }
  document.getElementById("shown").textContent = shown + " of " + rows.length + " images shown";
}

sort.addEventListener("change", update);
label.addEventListener("change", update);
update();
</script>
</body>
</html>
""")
