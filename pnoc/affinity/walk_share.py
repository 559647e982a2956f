"""Stage: the walk's own share — prior vs random walk, each with and without the dCRF, thresholds chosen on val.

A pseudo mask gains from two things the prior does not have: the random walk and the label dCRF that
follows it. Comparing the pseudo masks with the prior mixes both, and compares a background threshold
chosen on the evaluated split (the prior's, as in the paper's tables) with a fixed one (the walk's).
This stage measures the four cells of {prior, RW} × {no dCRF, dCRF} under one protocol:

1. for each cell, the background threshold is swept on the **selection split** (val) and the one of the
   best mIoU is kept (the authors' runner also picks the walk's threshold on val);
2. the four cells are scored at their chosen thresholds on the **evaluated split** (train) and on val.

The walk's share is ``RW − prior`` and ``RW + dCRF − (prior + dCRF)`` on the evaluated split. Two more
rows (``oracle: true``) walk the same stride-4 CAMs with the same settings over the ground truth
instead of AffinityNet, so a walk below its prior can be told apart from a walk that has nothing to gain:

* ``rw_gt_boundary``: over the ground-truth *boundary map* (:func:`gt_boundary`), the best input the
  chain's formulation (IRN's boundary map, with the chain's ``seed_mask``) can get at this grid. Its
  boundary lies on the cells that straddle an edge; with the reference's seeds × (1 − boundary) those
  cells lose their seeds, and where objects are only a few cells wide that is a large share of every object.
* ``rw_gt_affinity``: over the ground-truth *affinities* (:func:`cell_labels`,
  :func:`pnoc.affinity.random_walk.label_affinity`): two cells are linked when their majority labels
  agree, and every cell keeps its seed. This is the walk with a perfect affinity network, the
  ceiling of the random walk itself at this grid.

A mask
is the argmax over ``[threshold, maps...]`` (ties to the background), optionally refined by the
label dCRF of the chain's pseudo masks (``affinity.masks.crf_t`` / ``crf_gt_prob``): the masks are made by
:func:`pnoc.affinity.make_pseudo_masks.pseudo_mask`, the function rule make_pseudo_masks applies to the RW maps.

Writes ``<out>`` (JSON) and a markdown table beside it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pnoc import cli
from pnoc.affinity.make_pseudo_masks import pseudo_mask
from pnoc.affinity.propagate import propagate_batch
from pnoc.affinity.random_walk import label_affinity
from pnoc.cam.evaluate_priors import thresholds as threshold_grid
from pnoc.data.datasets import DataSource
from pnoc.evaluation import confusion, markdown_table, scores
from pnoc.io import DataError, load_maps, write_json, write_text
from pnoc.parallel import map_images

log = logging.getLogger("pnoc.affinity.walk_share")

CELLS = (("prior", False), ("prior", True), ("rw", False), ("rw", True))
ORACLE_CELLS = (("rw_gt_boundary", False), ("rw_gt_boundary", True), ("rw_gt_affinity", False), ("rw_gt_affinity", True))


@dataclass
class Config(DataSource):
    """Prior vs random walk, ± dCRF, background thresholds chosen on the selection split."""

    select_split: str
    eval_split: str
    prior_select: Path
    prior_eval: Path
    rw_select: Path
    rw_eval: Path
    out: Path
    variant: str = "pnoc_ls+saliency"
    th_min: float = 0.05
    th_max: float = 0.80
    th_step: float = 0.05
    crf_t: int = 10
    crf_gt_prob: float = 0.7
    oracle: bool = True
    radius: float = 5
    beta: float = 10
    exp_times: int = 8
    seed_mask: bool = True
    threads: int = 1

    def cells(self) -> tuple:
        return CELLS + (ORACLE_CELLS if self.oracle else ())


def gt_boundary(gt: np.ndarray, grid: tuple[int, int], stride: int = 4) -> np.ndarray:
    """The ground truth's boundary on the CAMs' stride-4 grid.

    Args:
        gt: (H, W) class ids; 255 (void) counts as background.
        grid: (h, w) of the stride-4 CAMs (``ceil(H / 4)`` × ``ceil(W / 4)``).

    Returns:
        float32 (h, w): 1 where the cell's ``stride`` × ``stride`` block of pixels holds more than one
        label (cells beyond the image are padded with the edge labels), 0 elsewhere.
    """
    h, w = grid
    g = np.where(gt == 255, 0, gt).astype(np.int64)
    g = np.pad(g, ((0, max(0, h * stride - g.shape[0])), (0, max(0, w * stride - g.shape[1]))), mode="edge")
    blocks = g[:h * stride, :w * stride].reshape(h, stride, w, stride).transpose(0, 2, 1, 3).reshape(h, w, -1)
    return (blocks.max(-1) != blocks.min(-1)).astype(np.float32)


def cell_labels(gt: np.ndarray, grid: tuple[int, int], stride: int = 4) -> np.ndarray:
    """The ground truth's majority label of every stride-4 cell.

    Args:
        gt: (H, W) class ids, 255 void.
        grid: (h, w) of the stride-4 CAMs (``ceil(H / 4)`` × ``ceil(W / 4)``).

    Returns:
        int64 (h, w): the most frequent non-void label of the cell's ``stride`` × ``stride`` block
        (ties to the smaller id; cells beyond the image are padded with the edge labels), 0 (background)
        where the block is all void.
    """
    h, w = grid
    g = np.pad(gt.astype(np.int64), ((0, max(0, h * stride - gt.shape[0])), (0, max(0, w * stride - gt.shape[1]))),
               mode="edge")
    blocks = g[:h * stride, :w * stride].reshape(h, stride, w, stride).transpose(0, 2, 1, 3).reshape(h * w, -1)
    valid = blocks != 255
    n = int(np.where(valid, blocks, 0).max()) + 1
    counts = np.zeros((h * w, n), np.int64)
    rows = np.broadcast_to(np.arange(h * w)[:, None], blocks.shape)
    np.add.at(counts, (rows[valid], blocks[valid]), 1)
    return counts.argmax(1).reshape(h, w)  # argmax of all-zero counts (all void) is 0, background


_W: dict = {}


def _init(cfg: Config, split: str, dirs: dict[str, Path], ths: dict[tuple[str, bool], list[float]]) -> None:
    torch.set_num_threads(1)  # one image per worker process: the walk of a 112 px image is tiny
    _W.update(cfg=cfg, ds=cfg.open_dataset(split), dirs=dirs, ths=ths)


def _read(folder: Path, image_id: str, hw: tuple[int, int], what: str) -> dict[str, np.ndarray]:
    path = Path(folder) / f"{image_id}.npz"
    if not path.is_file():
        raise DataError(f"{path}: {what} missing for image {image_id}; rerun the rule that writes {folder}")
    z = load_maps(path)
    if z["maps"].shape[1:] != hw:
        raise DataError(f"{path}: maps are {z['maps'].shape[1:]} but image {image_id} is {hw}; rerun that rule")
    return z


def _work(image_id: str) -> dict:
    cfg, ds, dirs, ths = _W["cfg"], _W["ds"], _W["dirs"], _W["ths"]
    hw = ds.image_size(image_id)
    gt = ds.read_mask(image_id, hw)
    img = np.array(ds.read_image(image_id))  # writable copy for pydensecrf
    crf = {"t": cfg.crf_t, "gt_prob": cfg.crf_gt_prob}
    n = ds.n_classes + 1
    files = {kind: _read(dirs[kind], image_id, hw, "CAMs" if kind == "prior" else "random-walk maps")
             for kind in ("prior", "rw")}
    maps = {kind: (z["maps"], z["keys"]) for kind, z in files.items()}
    if cfg.oracle:
        lr = files["prior"]["lr"].astype(np.float32)
        bnd = torch.from_numpy(gt_boundary(gt, lr.shape[1:]))
        rw = propagate_batch([torch.from_numpy(lr)], [bnd], [hw], cfg.radius, cfg.beta, cfg.exp_times,
                             seed_mask=cfg.seed_mask)[0]
        maps["rw_gt_boundary"] = (rw.numpy(), files["prior"]["keys"])
        aff = label_affinity(torch.from_numpy(cell_labels(gt, lr.shape[1:])), cfg.radius)
        rw = propagate_batch([torch.from_numpy(lr)], None, [hw], cfg.radius, cfg.beta, cfg.exp_times, affinities=[aff])[0]
        maps["rw_gt_affinity"] = (rw.numpy(), files["prior"]["keys"])
    out = {}
    for kind, with_crf in cfg.cells():
        m, keys = maps[kind]
        out[kind, with_crf] = np.stack([
            confusion(pseudo_mask(m, keys, t, img, crf if with_crf else None), gt, n) for t in ths[kind, with_crf]])
    return out


def sweep(cfg: Config, split: str, dirs: dict[str, Path], ths: dict[tuple[str, bool], list[float]]) -> dict:
    """Confusions of every cell at its thresholds on ``split``: {cell: (T, n, n)}."""
    ds = cfg.open_dataset(split)
    ds.validate(need_labels=False, need_masks=True)
    total = {cell: 0 for cell in cfg.cells()}
    for conf in map_images(ds.ids, _work, _init, (cfg, split, dirs, ths), cfg.threads, f"walk share {split}"):
        for cell in cfg.cells():
            total[cell] = total[cell] + conf[cell]
    return total


def run(cfg: Config) -> dict:
    grid = threshold_grid(cfg.th_min, cfg.th_max, cfg.th_step)
    cells = cfg.cells()
    select = sweep(cfg, cfg.select_split, {"prior": cfg.prior_select, "rw": cfg.rw_select},
                   {cell: grid for cell in cells})
    chosen, rows = {}, []
    for cell in cells:
        mious = [scores(c)["miou"] for c in select[cell]]
        i = int(np.argmax(mious))
        chosen[cell] = (grid[i], mious[i], mious)
    if cfg.eval_split == cfg.select_split:
        at_eval = {cell: chosen[cell][1] for cell in cells}
    else:
        ev = sweep(cfg, cfg.eval_split, {"prior": cfg.prior_eval, "rw": cfg.rw_eval},
                   {cell: [chosen[cell][0]] for cell in cells})
        at_eval = {cell: scores(ev[cell][0])["miou"] for cell in cells}
    for kind, with_crf in cells:
        t, m_sel, curve = chosen[kind, with_crf]
        rows.append({"maps": kind, "dcrf": with_crf, "threshold": t, f"{cfg.select_split}_miou": m_sel,
                     f"{cfg.eval_split}_miou": at_eval[kind, with_crf],
                     "sweep": [{"threshold": th, "miou": v} for th, v in zip(grid, curve)]})
    share = {"rw_minus_prior": at_eval["rw", False] - at_eval["prior", False],
             "rw_crf_minus_prior_crf": at_eval["rw", True] - at_eval["prior", True],
             "crf_on_prior": at_eval["prior", True] - at_eval["prior", False]}
    if cfg.oracle:
        share["gt_boundary_rw_minus_prior"] = at_eval["rw_gt_boundary", False] - at_eval["prior", False]
        share["gt_affinity_rw_minus_prior"] = at_eval["rw_gt_affinity", False] - at_eval["prior", False]
        share["gt_affinity_rw_crf_minus_prior_crf"] = at_eval["rw_gt_affinity", True] - at_eval["prior", True]
    metrics = {"stage": "walk_share", "variant": cfg.variant, "select_split": cfg.select_split,
               "eval_split": cfg.eval_split, "crf": {"t": cfg.crf_t, "gt_prob": cfg.crf_gt_prob},
               "walk": {"radius": cfg.radius, "beta": cfg.beta, "exp_times": cfg.exp_times},
               "cells": rows, "share": share}
    table = [{"maps": r["maps"], "dCRF": "yes" if r["dcrf"] else "no", "threshold (val)": r["threshold"],
              f"{cfg.select_split} mIoU": r[f"{cfg.select_split}_miou"],
              f"{cfg.eval_split} mIoU": r[f"{cfg.eval_split}_miou"]} for r in rows]
    md = (f"# The walk's share: `{cfg.variant}`\n\nBackground thresholds chosen on `{cfg.select_split}` for each "
          f"row; dCRF t = {cfg.crf_t}, gt_prob {cfg.crf_gt_prob}.\n\n" + markdown_table(table)
          + f"\nOn `{cfg.eval_split}`: RW − prior **{100 * share['rw_minus_prior']:+.2f}** points; RW + dCRF − "
          f"(prior + dCRF) **{100 * share['rw_crf_minus_prior_crf']:+.2f}**; the dCRF alone on the prior "
          f"{100 * share['crf_on_prior']:+.2f}."
          + (f" The walk over the ground-truth boundary map (`rw_gt_boundary`) − prior: "
             f"**{100 * share['gt_boundary_rw_minus_prior']:+.2f}**; over the ground-truth affinities "
             f"(`rw_gt_affinity`, the walk's ceiling at this grid) − prior: "
             f"**{100 * share['gt_affinity_rw_minus_prior']:+.2f}**, with the dCRF on both "
             f"**{100 * share['gt_affinity_rw_crf_minus_prior_crf']:+.2f}**." if cfg.oracle else "") + "\n")
    write_text(Path(cfg.out).with_suffix(".md"), md)
    write_json(cfg.out, metrics)
    log.info("walk share %s on %s: RW - prior %+.4f, with dCRF %+.4f", cfg.variant, cfg.eval_split,
             share["rw_minus_prior"], share["rw_crf_minus_prior_crf"])
    return metrics


if __name__ == "__main__":
    cli.main(run, Config)
