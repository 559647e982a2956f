"""Per-image work over a process pool (CPU-bound stages such as the dCRF)."""

from __future__ import annotations

import multiprocessing as mp
from typing import Callable, Iterator, Sequence

from tqdm import tqdm


def map_images(ids: Sequence[str], work: Callable, init: Callable, init_args: tuple, threads: int,
               desc: str) -> Iterator:
    """Yield ``work(image_id)`` for every id, in order, with a progress bar.

    ``init(*init_args)`` prepares the worker state (once per worker process, or once in this
    process when ``threads`` ≤ 1); ``work`` must be a module-level function so it pickles.
    """
    with tqdm(total=len(ids), desc=desc, mininterval=10) as bar:
        if threads > 1:
            with mp.get_context("fork").Pool(threads, init, init_args) as pool:
                for result in pool.imap(work, ids, chunksize=4):
                    yield result
                    bar.update()
        else:
            init(*init_args)
            for image_id in ids:
                yield work(image_id)
                bar.update()


def pool_map(work: Callable, items: Sequence, threads: int, chunk_cap: int = 64, serial_below: int = 65) -> list:
    """``[work(item) for item in items]``, over ``threads`` forked workers when there are ``serial_below`` items or
    more (a pool costs more than it saves on a few); ``work`` must be a module-level function so it pickles.

    Chunks are sized for about four per worker, at most ``chunk_cap`` items each.
    """
    if threads <= 1 or len(items) < serial_below:
        return [work(item) for item in items]
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(threads) as pool:
        return pool.map(work, items, chunksize=max(1, min(chunk_cap, len(items) // (4 * threads))))

