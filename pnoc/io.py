"""Artifact input/output: atomic writes, images, masks, CAM files, JSON.

Every writer goes through :func:`atomic_path`: the data is written to a temporary
file in the destination folder and renamed over the target, so a killed job never
leaves a half-written file that looks complete.

Every reader raises :class:`DataError` naming the offending file and the fix;
nothing is skipped silently.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError


class DataError(ValueError):
    """Bad input data. The message names the file and how to fix it."""


# ---------------------------------------------------------------------------
# atomic writing
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success.

    Args:
        path: final destination.
        suffix: suffix of the temporary file (defaults to the target's), so that
            libraries choosing a format by extension (PIL, numpy) keep working.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp" + (suffix if suffix is not None else path.suffix),
        dir=path.parent,
    )
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes owner-only files; an artifact gets the mode of a plain open() (0666 minus the umask),
    # so colleagues on a shared cluster can read the results
    umask = os.umask(0)
    os.umask(umask)
    tmp_path.chmod(0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def read_json(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; run the rule that produces it first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}); delete it and rerun the rule that produces it") from e


# ---------------------------------------------------------------------------
# images and masks
# ---------------------------------------------------------------------------


def voc_palette(n: int = 256) -> np.ndarray:
    """The Pascal VOC colour map.

    Returns:
        uint8 array (n, 3); index 255 is (224, 224, 192) like VOC's void colour.
    """
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


_PALETTE = voc_palette()


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an RGB image.

    Returns:
        uint8 array (H, W, 3).

    Raises:
        DataError: missing, unreadable or truncated file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image not found; check the dataset root and the image list")
    try:
        with Image.open(path) as im:
            im.load()  # forces decoding: catches truncated files
            arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(
            f"{path}: corrupt or truncated image ({e}); replace the file or remove its id from the image list"
        ) from e
    return arr


def read_mask(path: str | os.PathLike, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Read a segmentation mask of class indices (palette or grayscale PNG; RGB is colour-decoded).

    Args:
        path: PNG file.
        expected_hw: if given, the (H, W) of the matching image; a mismatch raises.

    Returns:
        uint8 array (H, W): 0 = background, 1..C classes, 255 = ignore.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: mask not found; provide the ground-truth mask or drop the image from the list")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "L", "I", "I;16"):
                arr = np.asarray(im).astype(np.uint8)
            else:
                arr = _decode_rgb_mask(np.asarray(im.convert("RGB")), path)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{path}: corrupt mask ({e}); regenerate or replace it") from e
    if expected_hw is not None and tuple(arr.shape[:2]) != tuple(expected_hw):
        raise DataError(
            f"{path}: mask size {arr.shape[1]}x{arr.shape[0]} differs from its image "
            f"{expected_hw[1]}x{expected_hw[0]}; masks must have the image's size"
        )
    return arr


def _decode_rgb_mask(rgb: np.ndarray, path: Path) -> np.ndarray:
    key = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    lut = {(int(r) << 16) | (int(g) << 8) | int(b): i for i, (r, g, b) in enumerate(_PALETTE)}
    out = np.full(key.shape, 255, np.uint8)
    for k in np.unique(key):
        if int(k) not in lut:
            raise DataError(f"{path}: RGB mask has colour #{int(k):06x} outside the VOC palette; save masks as palette PNGs")
        out[key == k] = lut[int(k)]
    return out


def write_mask(path: str | os.PathLike, mask: np.ndarray, palette: bool = True) -> None:
    """Write an index mask as PNG (palette PNG by default, VOC colours).

    Args:
        mask: integer array (H, W) with values in 0..255.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if mask.min(initial=0) < 0 or mask.max(initial=0) > 255:
        raise ValueError("mask values must lie in 0..255")
    im = Image.fromarray(mask.astype(np.uint8), mode="L")
    if palette:
        im = im.convert("P")
        im.putpalette(_PALETTE.reshape(-1).tolist())
    with atomic_path(path, ".png") as tmp:
        im.save(tmp, format="PNG")


def write_image(path: str | os.PathLike, rgb: np.ndarray, quality: int = 95, subsampling: int = -1) -> None:
    """Write an RGB uint8 array (H, W, 3) as JPEG or PNG by the path's suffix.

    Args:
        quality: JPEG quality.
        subsampling: JPEG chroma subsampling (PIL: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0, -1 = PIL's default).
    """
    im = Image.fromarray(np.asarray(rgb, dtype=np.uint8))
    fmt = "JPEG" if Path(path).suffix.lower() in (".jpg", ".jpeg") else "PNG"
    with atomic_path(path) as tmp:
        if fmt == "JPEG":
            im.save(tmp, format=fmt, quality=quality, subsampling=subsampling)
        else:
            im.save(tmp, format=fmt)


def write_gray(path: str | os.PathLike, values: np.ndarray) -> None:
    """Write a map in [0, 1] (H, W) as an 8-bit grayscale PNG (0..255)."""
    arr = np.clip(np.round(np.asarray(values, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    with atomic_path(path, ".png") as tmp:
        Image.fromarray(arr, mode="L").save(tmp, format="PNG")


def read_gray(path: str | os.PathLike, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Read an 8-bit grayscale PNG as float32 in [0, 1] (H, W)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: map not found; run the rule that produces it for this image")
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{path}: corrupt map ({e}); delete it and rerun its rule") from e
    if expected_hw is not None and tuple(arr.shape) != tuple(expected_hw):
        raise DataError(f"{path}: size {arr.shape[1]}x{arr.shape[0]} differs from the image {expected_hw[1]}x{expected_hw[0]}")
    return arr


# ---------------------------------------------------------------------------
# per-image class maps (CAMs, saliency, random-walk maps)
# ---------------------------------------------------------------------------


def save_maps(path: str | os.PathLike, maps: np.ndarray, keys: np.ndarray, **extra: np.ndarray) -> None:
    """Store per-class maps compactly: float16 arrays in a compressed ``.npz``.

    Args:
        maps: (K, H, W) values in [0, 1], one channel per entry of ``keys``.
        keys: (K,) int class indices (1-based, 0 = background) of the channels.
        extra: more arrays to store (e.g. ``lr=`` a stride-4 copy).
    """
    maps = np.asarray(maps)
    keys = np.asarray(keys, dtype=np.int16)
    if maps.ndim != 3 or maps.shape[0] != keys.shape[0]:
        raise ValueError(f"maps {maps.shape} do not match keys {keys.shape}")
    arrays = {"maps": maps.astype(np.float16), "keys": keys}
    arrays.update({k: np.asarray(v).astype(np.float16) if np.asarray(v).dtype.kind == "f" else np.asarray(v)
                   for k, v in extra.items()})
    with atomic_path(path, ".npz") as tmp:
        np.savez_compressed(tmp, **arrays)


def load_maps(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a file written by :func:`save_maps`; float arrays come back as float32."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: maps not found; run the rule that produces them for this image")
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: (z[k].astype(np.float32) if z[k].dtype.kind == "f" else z[k]) for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: corrupt maps file ({e}); delete it and rerun its rule") from e
    if "maps" not in out or "keys" not in out:
        raise DataError(f"{path}: missing 'maps'/'keys' arrays; it was not written by pnoc")
    return out


# What an object array in a label file (IRN's / PuzzleCAM's cls_labels.npy: a pickled dict of id -> vector) may
# hold: numpy arrays, dtypes and scalars. Anything else (os.system, eval, ...) is refused before it runs.
_SAFE_NPY_GLOBALS = {
    (mod, name)
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy")
    for name in ("_reconstruct", "scalar", "ndarray", "dtype")
} | {("numpy", "dtypes.Float32DType")}


def load_label_dict(path: str | os.PathLike) -> dict:
    """Read a label file saved with ``np.save(path, {id: vector})`` without arbitrary unpickling.

    ``np.load(allow_pickle=True)`` would run any callable a crafted file names; this reader unpickles
    the object array with a whitelist of numpy's array/scalar constructors only.

    Returns:
        the dict stored in the file (keys as written, values numpy arrays).

    Raises:
        DataError: unreadable file, not a dict, or a pickle that names anything outside the whitelist.
    """
    import pickle

    path = Path(path)

    class _Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in _SAFE_NPY_GLOBALS or (module.startswith("numpy") and name.endswith("DType")):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"refused global {module}.{name}")

    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(version, np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(f)
            if dtype.hasobject:
                arr = _Restricted(f).load()
            else:
                raise DataError(f"{path}: holds a plain {dtype} array of shape {shape}, not a dict of id -> labels; "
                                f"save it with np.save(path, {{image_id: vector}})")
    except DataError:
        raise
    except pickle.UnpicklingError as e:
        raise DataError(
            f"{path}: refused to load ({e}): a label file holds numpy arrays only, and this one names other code "
            f"that unpickling would run; re-create it with np.save(path, {{image_id: vector}})"
        ) from e
    except Exception as e:  # noqa: BLE001 - any decoding failure, re-raised with the file name
        raise DataError(f"{path}: unreadable label file ({e}); regenerate it") from e
    obj = arr.item() if isinstance(arr, np.ndarray) and arr.shape == () else arr
    if not isinstance(obj, dict):
        raise DataError(f"{path}: holds a {type(obj).__name__}, not a dict of image id -> label vector")
    return obj


def read_lines(path: str | os.PathLike) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: list file not found")
    return [ln.strip().split()[0] for ln in path.read_text().splitlines() if ln.strip()]


def describe(mapping: Mapping) -> str:
    return ", ".join(f"{k}={v}" for k, v in mapping.items())


def write_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write a list of flat dicts as CSV (columns = union of keys, in first-seen order)."""
    import csv
    import io as _io

    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    write_text(path, buf.getvalue())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success replace ``path`` by it.

    Per-image artifact folders (CAMs, masks) are written this way, so a killed job
    leaves either the previous complete folder or none, never a partial one.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes owner-only folders; artifacts are meant to be shared
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
