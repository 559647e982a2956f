"""Stage: qualitative panels for the HTML report — one overlay PNG per stage.

For ``images`` images of a split (evenly spaced over its list) each panel is a grid
whose rows are images and whose columns are: the image, the ground truth, then the
stage's output overlaid on the image. Index masks (priors, pseudo masks, predictions)
are drawn in the VOC palette colours (background black, void cream), saliency maps
(grayscale PNGs in [0, 1]) in a black-red-yellow-white heat scale. ``all.png`` shows
every column side by side (image | ground truth | prior | saliency | pseudo mask |
prediction, whichever are given), with a class-colour legend under each panel.

Columns are given as ``name=folder`` (``--masks`` for index PNGs, ``--maps`` for
saliency PNGs); they appear in the order of ``--columns`` when given, else masks then
maps. Every panel is ``<out_dir>/<name>.png``; ``_info.json`` lists the images shown.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pnoc import cli
from pnoc.data.datasets import DataSource
from pnoc.io import DataError, atomic_dir, read_gray, read_mask, voc_palette, write_image, write_json

log = logging.getLogger("pnoc.report.gallery")

_PALETTE = voc_palette()


@dataclass
class Config(DataSource):
    """Per-stage overlay panels for the report."""

    split: str
    out_dir: Path
    masks: list[str] = field(default_factory=list)
    maps: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    images: int = 6
    cell: int = 128
    alpha: float = 0.65


def _parse(items: list[str], kind: str) -> dict[str, tuple[str, Path]]:
    out = {}
    for it in items:
        if "=" not in it:
            raise DataError(f"--{kind} {it!r}: expected name=folder")
        name, folder = it.split("=", 1)
        out[name] = (kind, Path(folder))
    return out


def pick_ids(ids: list[str], k: int) -> list[str]:
    """``k`` ids evenly spaced over the list (all of them if there are fewer)."""
    if k >= len(ids):
        return list(ids)
    idx = np.unique(np.linspace(0, len(ids) - 1, k).round().astype(int))
    return [ids[i] for i in idx]


def heat(v: np.ndarray) -> np.ndarray:
    """[0, 1] (H, W) -> uint8 RGB black → red → yellow → white."""
    v = np.clip(np.asarray(v, np.float32), 0, 1)
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], -1)
    return (rgb * 255).round().astype(np.uint8)


def overlay(img: np.ndarray, colour: np.ndarray, alpha: float) -> np.ndarray:
    return ((1 - alpha) * img.astype(np.float32) + alpha * colour.astype(np.float32)).round().astype(np.uint8)


def _fit(arr: np.ndarray, hw: tuple[int, int], nearest: bool) -> np.ndarray:
    if arr.shape[:2] == tuple(hw):
        return arr
    im = Image.fromarray(arr)
    return np.asarray(im.resize((hw[1], hw[0]), Image.NEAREST if nearest else Image.BILINEAR))


def render_cell(kind: str, img: np.ndarray, path: Path | None, alpha: float) -> np.ndarray:
    """One overlay at the image's size; ``kind`` is image | masks | maps."""
    hw = img.shape[:2]
    if kind == "image":
        return img
    if kind == "masks":
        m = _fit(read_mask(path), hw, nearest=True)
        return overlay(img, _PALETTE[m], alpha)
    g = read_gray(path)
    g = _fit((g * 255).round().astype(np.uint8), hw, nearest=False).astype(np.float32) / 255
    return overlay(img, heat(g), alpha)


def _resize_h(arr: np.ndarray, h: int) -> np.ndarray:
    w = max(1, round(arr.shape[1] * h / arr.shape[0]))
    return np.asarray(Image.fromarray(arr).resize((w, h), Image.NEAREST))


def legend(classes: list[str], width: int) -> np.ndarray:
    """Rows of colour swatches with class names (background first), ``width`` px wide."""
    names = ["background"] + list(classes)
    item_w, row_h = 110, 14
    per_row = max(1, width // item_w)
    rows = (len(names) + per_row - 1) // per_row
    im = Image.new("RGB", (max(width, item_w), rows * row_h + 4), (255, 255, 255))
    d = ImageDraw.Draw(im)
    for i, n in enumerate(names):
        x, y = (i % per_row) * item_w + 2, (i // per_row) * row_h + 2
        d.rectangle([x, y + 1, x + 10, y + 11], fill=tuple(int(c) for c in _PALETTE[i]), outline=(0, 0, 0))
        d.text((x + 14, y), n[:15], fill=(0, 0, 0))
    return np.asarray(im)


def panel(rows: list[list[np.ndarray]], titles: list[str], classes: list[str], cell: int) -> np.ndarray:
    """Grid of cells (each resized to height ``cell``) with a title row and a legend."""
    rows = [[_resize_h(c, cell) for c in r] for r in rows]
    col_w = [max(r[j].shape[1] for r in rows) for j in range(len(titles))]
    gap, head = 4, 16
    width = sum(col_w) + gap * (len(col_w) + 1)
    height = head + len(rows) * (cell + gap) + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    x = gap
    for j, t in enumerate(titles):
        d.text((x, 2), t, fill=(0, 0, 0))
        x += col_w[j] + gap
    for i, r in enumerate(rows):
        x = gap
        for j, c in enumerate(r):
            canvas.paste(Image.fromarray(c), (x, head + i * (cell + gap)))
            x += col_w[j] + gap
    grid = np.asarray(canvas)
    leg = legend(classes, width)
    if leg.shape[1] < width:
        leg = np.pad(leg, ((0, 0), (0, width - leg.shape[1]), (0, 0)), constant_values=255)
    elif leg.shape[1] > width:
        grid = np.pad(grid, ((0, 0), (0, leg.shape[1] - width), (0, 0)), constant_values=255)
    return np.concatenate([grid, leg], 0)


def run(cfg: Config) -> dict:
    ds = cfg.open_dataset(cfg.split)
    cols = {**_parse(cfg.masks, "masks"), **_parse(cfg.maps, "maps")}
    order = list(cfg.columns) or list(cols)
    unknown = [c for c in order if c not in cols]
    if unknown:
        raise DataError(f"--columns {unknown}: not given with --masks/--maps")
    if not order:
        raise DataError("no stage column given: pass --masks name=folder and/or --maps name=folder")
    ids = pick_ids(ds.ids, cfg.images)
    base_titles = ["image", "ground truth"]
    cells: dict[str, list[np.ndarray]] = {"image": [], "ground truth": [], **{c: [] for c in order}}
    for image_id in ids:
        img = ds.read_image(image_id)
        cells["image"].append(img)
        cells["ground truth"].append(overlay(img, _PALETTE[ds.read_mask(image_id, img.shape[:2])], cfg.alpha))
        for c in order:
            kind, folder = cols[c]
            path = folder / f"{image_id}.png"
            if not path.is_file():
                raise DataError(f"{path}: no {c} output for image {image_id}; rerun the rule that writes {folder}")
            cells[c].append(render_cell(kind, img, path, cfg.alpha))
    written = []
    with atomic_dir(cfg.out_dir) as tmp:
        for c in order:
            titles = base_titles + [c.replace("_", " ")]
            rows = [[cells[t][i] for t in ("image", "ground truth", c)] for i in range(len(ids))]
            write_image(tmp / f"{c}.png", panel(rows, titles, ds.classes, cfg.cell))
            written.append(f"{c}.png")
        titles = base_titles + [c.replace("_", " ") for c in order]
        rows = [[cells[t][i] for t in ("image", "ground truth", *order)] for i in range(len(ids))]
        write_image(tmp / "all.png", panel(rows, titles, ds.classes, cfg.cell))
        written.append("all.png")
        info = {"stage": "gallery", "split": cfg.split, "images": ids, "columns": {c: str(cols[c][1]) for c in order},
                "panels": written}
        write_json(tmp / "_info.json", info)
    log.info("gallery of %d images, columns %s -> %s", len(ids), order, cfg.out_dir)
    return info


if __name__ == "__main__":
    cli.main(run, Config)
