"""``torch.utils.data.Dataset`` wrappers over :class:`WSSSDataset` for the training stages."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pnoc.data.datasets import WSSSDataset
from pnoc.data.transforms import Augmenter, to_tensor_image
from pnoc.distributed import Distributed, SeededItems
from pnoc.io import DataError, read_mask


class ClassificationSet(SeededItems):
    """Items: ``(x (3, crop, crop) float, y (C,) float, index)``; keys ``i`` or ``(i, item_seed)``."""

    def __init__(self, ds: WSSSDataset, augmenter: Augmenter):
        self.ds, self.aug = ds, augmenter
        # fail before training starts, naming the first bad image, instead of mid-epoch
        ds.validate(need_labels=True)

    def __len__(self) -> int:
        return len(self.ds)

    def item(self, i: int):
        image_id = self.ds.ids[i]
        img = to_tensor_image(self.ds.read_image(image_id))
        x, _ = self.aug(img)
        return x, torch.from_numpy(self.ds.labels(image_id)), i


class PairedSet(SeededItems):
    """Image plus per-image auxiliary maps loaded by ``load_aux(image_id, (H, W))``.

    ``load_aux`` returns a list of arrays: uint8 (H, W) label maps or float (C, H, W) maps.
    Items: ``(x, *aux_tensors, y, index)``.
    """

    def __init__(self, ds: WSSSDataset, augmenter: Augmenter,
                 load_aux: Callable[[str, tuple[int, int]], list[np.ndarray]], need_labels: bool = True):
        self.ds, self.aug, self.load_aux, self.need_labels = ds, augmenter, load_aux, need_labels
        ds.validate(need_labels=need_labels)

    def __len__(self) -> int:
        return len(self.ds)

    def item(self, i: int):
        image_id = self.ds.ids[i]
        arr = self.ds.read_image(image_id)
        aux = [torch.from_numpy(np.ascontiguousarray(a)) for a in self.load_aux(image_id, arr.shape[:2])]
        x, aux = self.aug(to_tensor_image(arr), aux)
        aux = [a.long() if a.dtype == torch.uint8 else a for a in aux]
        y = torch.from_numpy(self.ds.labels(image_id)) if self.need_labels else torch.zeros(self.ds.n_classes)
        return (x, *aux, y, i)


def mask_loader(mask_dir: str | Path | None, ds: WSSSDataset) -> Callable[[str, tuple[int, int]], list[np.ndarray]]:
    """Aux loader reading index PNGs from ``mask_dir`` (or the ground truth when ``None``)."""

    def load(image_id: str, hw: tuple[int, int]) -> list[np.ndarray]:
        if mask_dir is None:
            return [ds.read_mask(image_id, hw)]
        p = Path(mask_dir) / f"{image_id}.png"
        if not p.is_file():
            raise DataError(f"{p}: mask missing for training image {image_id}; rerun the rule that writes {mask_dir}")
        return [read_mask(p, hw)]

    return load


def epoch_loader(dataset: Dataset, batch_size: int, seed: int, epoch: int, num_workers: int,
                 shuffle: bool = True, drop_last: bool = True) -> DataLoader:
    """A single process's loader of epoch ``epoch``: order and augmentation depend only on ``(seed, epoch)``.

    This is what makes a resumed run identical to an uninterrupted one: epoch ``e`` sees the same
    permutation and the same augmentation draws either way (and with any worker or process count,
    see :class:`pnoc.distributed.GlobalBatchSampler`). Training stages get theirs from
    ``EpochRunner.loader``, which also slices the batches across processes.
    """
    return Distributed().loader(dataset, batch_size, seed, epoch, num_workers, shuffle, drop_last)
