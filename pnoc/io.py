"""Artifact input/output: atomic writes, images, masks, CAM files, JSON.

Every writer goes through :func:`atomic_path`: the data is written to a temporary
file in the destination folder and renamed over the target, so a killed job never
leaves a half-written file that looks complete. A write that finds its filesystem full
raises :class:`DiskFullError` naming the folder, the space written and needed and the fix,
after removing its temporary file or folder (a previous version of the target stays intact).

Every reader raises :class:`DataError` naming the offending file and the fix;
nothing is skipped silently.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError


class DataError(ValueError):
    """Bad input data. The message names the file and how to fix it."""


class ResourceError(RuntimeError):
    """The machine ran out of something a stage needs (disk space, memory).

    The message names what ran out and where, how much was needed, and the config key or action that fixes it.
    Entry points end on it as on a :class:`DataError` (exit code 2, the message, no traceback).
    """


class DiskFullError(ResourceError):
    """A write found its filesystem full (``ENOSPC``) or the quota spent (``EDQUOT``); nothing of it was kept."""


# ---------------------------------------------------------------------------
# atomic writing
# ---------------------------------------------------------------------------

_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}
_ROOM_FIX = ("free space on that filesystem (or set the config key `results` to a folder on a larger one), "
             "then rerun")


def human_bytes(n: float) -> str:
    """Bytes as B / KiB / MiB / GiB (one decimal)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _existing(folder: Path) -> Path:
    """``folder`` or its nearest existing ancestor (what statvfs can ask about before mkdir)."""
    folder = Path(os.path.abspath(folder))
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return folder


def free_space(folder: str | os.PathLike) -> tuple[int, int]:
    """(bytes free to unprivileged users, total bytes) of the filesystem that holds ``folder``."""
    st = os.statvfs(_existing(Path(folder)))
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def out_of_space(e: BaseException, folder: str | os.PathLike) -> str | None:
    """Why ``e`` is a full filesystem (``no space left on the device`` / ``disk quota exceeded``), else None.

    An ``OSError`` with ``ENOSPC`` or ``EDQUOT`` anywhere in the chain of ``e`` counts. ``torch.save`` to a path
    writes from C++ and reports a short write as a bare ``RuntimeError``: that one counts when the filesystem of
    ``folder`` has less than 1 MiB left.
    """
    seen, x = set(), e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in _FULL:
            return _FULL[x.errno]
        x = x.__cause__ or x.__context__
    if isinstance(e, DiskFullError):  # a nested writer's, whose cause had no errno (torch's C++ writer)
        return _FULL[errno.ENOSPC]
    if isinstance(e, RuntimeError) and not isinstance(e, ResourceError):
        try:
            if free_space(folder)[0] < 2**20:
                return _FULL[errno.ENOSPC]
        except OSError:
            pass
    return None


def _space_now(folder: Path) -> str:
    try:
        free, total = free_space(folder)
    except OSError:
        return "free space unknown"
    return f"{human_bytes(free)} free of {human_bytes(total)} there now"


def _no_room_before_writing(e: OSError, path: Path) -> DiskFullError | None:
    """What to raise when the temporary file or folder of ``path`` cannot even be created because the filesystem
    is full: a :class:`DiskFullError` naming the folder and what is free; None for any other error."""
    why = out_of_space(e, path.parent)
    if why is None:
        return None
    return DiskFullError(f"{path}: {why} in {path.parent} before writing it ({_space_now(path.parent)}); {_ROOM_FIX}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None, need: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success.

    Args:
        path: final destination.
        suffix: suffix of the temporary file (defaults to the target's), so that
            libraries choosing a format by extension (PIL, numpy) keep working.
        need: bytes the file will take, when the writer knows (a checkpoint's tensors); only for the message
            of a full disk.

    Raises:
        DiskFullError: the filesystem filled up (or the quota ran out) while writing: the temporary file is
            removed, a previous ``path`` is left as it was, and the message names the folder, the bytes
            written and needed, the space left and the fix.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=".tmp" + (suffix if suffix is not None else path.suffix),
            dir=path.parent,
        )
    except OSError as e:
        full = _no_room_before_writing(e, path)
        if full is None:
            raise
        raise full from e
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
    except (OSError, RuntimeError) as e:
        why = out_of_space(e, path.parent)
        if why is None or isinstance(e, ResourceError):
            raise
        written = tmp_path.stat().st_size if tmp_path.exists() else 0
        tmp_path.unlink(missing_ok=True)  # first, so that the message counts the space it gives back
        needed = f", about {human_bytes(need)} needed" if need else ""
        kept = f"; the previous {path.name} is intact" if path.exists() else ""
        raise DiskFullError(f"{path}: {why} in {path.parent} after writing {human_bytes(written)} of it{needed} "
                            f"({_space_now(path.parent)}); the partial file was removed{kept}; {_ROOM_FIX}") from e
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
_GRAY_PALETTE_LEVELS = np.array(sorted({int(c[0]) for c in _PALETTE if c[0] == c[1] == c[2]}), np.uint8)


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


MASK_ENCODINGS = {
    "palette": "palette PNG: its indices",
    "gray": "gray PNG: its values",
    "gray16": "16-bit gray PNG: its values",
    "gray+alpha": "gray PNG with alpha: its values, alpha ignored",
    "rgb-gray": "RGB PNG with equal channels (class indices saved as colour): one channel's values",
    "rgb-palette": "RGB PNG: colours decoded through the VOC palette",
    "rgba-gray": "RGBA PNG with equal colour channels: one channel's values, alpha ignored",
    "rgba-palette": "RGBA PNG: colours decoded through the VOC palette, alpha ignored",
}
"""How :func:`decode_mask` read a mask, by the encoding it reports (the dataset check lists the ones it met)."""


def decode_mask(path: str | os.PathLike) -> tuple[np.ndarray, str]:
    """Decode a class-index mask, whatever PNG flavour holds it.

    Palette PNGs (VOC's ``SegmentationClass``) give their indices and gray PNGs (SBD's ``SegmentationClassAug``,
    the COCO masks of RIB, PNOC, CLIMS and coco2voc) their values. An RGB or RGBA mask is ambiguous: a
    mask whose colour channels are equal everywhere holds the class indices as gray levels (ToCo's COCO
    masks were reported as 4-channel PNGs); otherwise its colours are decoded through the VOC palette.
    Alpha is ignored.

    Returns:
        (uint8 array (H, W), encoding): the encoding is a key of :data:`MASK_ENCODINGS`.

    Raises:
        DataError: missing or corrupt file, a 16-bit value above 255, an RGB colour outside the palette.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: mask not found; provide the ground-truth mask or drop the image from the list")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "P":
                return np.asarray(im).astype(np.uint8), "palette"
            if mode in ("L", "1"):
                return np.asarray(im.convert("L")), "gray"
            if mode == "LA":
                return np.asarray(im.getchannel("L")), "gray+alpha"
            if mode.startswith("I"):
                arr = np.asarray(im)
                if arr.size and int(arr.max()) > 255:
                    raise DataError(f"{path}: 16-bit mask with value {int(arr.max())}; class indices are 0..254 and "
                                    f"255 (ignore): save it as an 8-bit gray or palette PNG")
                return arr.astype(np.uint8), "gray16"
            rgb = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{path}: corrupt mask ({e}); regenerate or replace it") from e
    kind = "rgba" if mode in ("RGBA", "RGBa", "PA") else "rgb"
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        # four VOC palette colours are gray themselves: (0,0,0) 0, (64,64,64) 56, (128,128,128) 7 and
        # (192,192,192) 63; a mask of those levels only is a colour mask (VOC's classes saved as RGB)
        if not np.isin(rgb[..., 0], _GRAY_PALETTE_LEVELS).all():
            return np.ascontiguousarray(rgb[..., 0]), f"{kind}-gray"
    return _decode_rgb_mask(rgb, path), f"{kind}-palette"


def read_mask(path: str | os.PathLike, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Read a segmentation mask of class indices (any encoding :func:`decode_mask` reads).

    Args:
        path: PNG file.
        expected_hw: if given, the (H, W) of the matching image; a mismatch raises.

    Returns:
        uint8 array (H, W): 0 = background, 1..C classes, 255 = ignore.
    """
    arr, _ = decode_mask(path)
    check_mask_size(arr, path, expected_hw)
    return arr


def check_mask_size(arr: np.ndarray, path: str | os.PathLike, expected_hw: tuple[int, int] | None) -> None:
    """Raise a :class:`DataError` naming ``path`` when the mask ``arr`` (H, W) is not of the image's size."""
    if expected_hw is not None and tuple(arr.shape[:2]) != tuple(expected_hw):
        raise DataError(
            f"{path}: mask size {arr.shape[1]}x{arr.shape[0]} differs from its image "
            f"{expected_hw[1]}x{expected_hw[0]}; masks must have the image's size"
        )


def _decode_rgb_mask(rgb: np.ndarray, path: Path) -> np.ndarray:
    key = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    lut = {(int(r) << 16) | (int(g) << 8) | int(b): i for i, (r, g, b) in enumerate(_PALETTE)}
    out = np.full(key.shape, 255, np.uint8)
    for k in np.unique(key):
        if int(k) not in lut:
            raise DataError(f"{path}: RGB mask has colour #{int(k):06x} outside the VOC palette; save masks as palette "
                            f"PNGs, or as gray PNGs of class indices")
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
# hold: numpy arrays, dtypes and scalars (numpy.int32 keys are scalars), and the bytes of their data. Anything else
# (os.system, eval, ...) is refused before it runs.
_NUMPY_GLOBALS = {"_reconstruct", "scalar", "ndarray", "dtype"}
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy")


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as a pickle of protocol 2 uses it: the bytes of an array, stored as a latin-1 str.

    Only that use is allowed; any other codec a crafted file names is refused.
    """
    if not isinstance(text, str) or encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(
            f"refused _codecs.encode({type(text).__name__}, {encoding!r}): only latin-1 bytes are array data")
    return text.encode("latin-1", errors)


def load_label_dict(path: str | os.PathLike) -> dict:
    """Read a label file saved with ``np.save(path, {id: vector})`` without arbitrary unpickling.

    ``np.load(allow_pickle=True)`` would run any callable a crafted file names; this reader unpickles
    the object array with a whitelist: numpy's array, dtype and scalar constructors, and the latin-1
    ``_codecs.encode`` by which a pickle of protocol 2 (IRN's ``voc12/cls_labels.npy``, also shipped by AMN and
    CLIMS) stores the bytes of its arrays and ``numpy.int32`` keys. Files written by numpy 1.x name
    ``numpy.core.multiarray``; they are read with numpy 2's ``numpy._core`` without a deprecation warning.

    Returns:
        the dict stored in the file (keys as written: str, int or numpy integers; values numpy arrays).

    Raises:
        DataError: unreadable file, not a dict, or a pickle that names anything outside the whitelist.
    """
    path = Path(path)
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray

    class _Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if module in _NUMPY_MODULES and name in _NUMPY_GLOBALS:
                return getattr(multiarray if name in ("_reconstruct", "scalar") else np, name)
            if (module, name) == ("_codecs", "encode"):
                return _latin1_encode
            if (module, name) in (("builtins", "bytes"), ("__builtin__", "bytes")):
                return bytes  # protocol 2 writes an empty bytes object as bytes()
            if module.startswith("numpy") and name.endswith("DType"):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"refused global {module}.{name}")

    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(version, np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(f)
            if dtype.hasobject:
                # latin1: a pickle written by Python 2 stores array bytes as str (numpy's own advice for such files)
                arr = _Restricted(f, encoding="latin1").load()
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
def atomic_dir(path: str | os.PathLike, expect: int | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success replace ``path`` by it.

    Per-image artifact folders (CAMs, masks) are written this way, so a killed job
    leaves either the previous complete folder or none, never a partial one.

    Args:
        path: the final folder.
        expect: files the folder will hold (e.g. one per image), when known; only for the estimate of the
            space needed in the message of a full disk.

    Raises:
        DiskFullError: the filesystem filled up while the folder was written: the partial folder is removed
            (a previous ``path`` stays as it was), and the message names the folder, what was written, the
            space the whole folder needs (from the mean file so far and ``expect``), what is free and the fix.
    """
    import shutil

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        full = _no_room_before_writing(e, path)
        if full is None:
            raise
        raise full from e
    tmp.chmod(0o755)  # mkdtemp makes owner-only folders; artifacts are meant to be shared
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        why = out_of_space(e, path.parent)
        if why is None:
            raise
        # what the folder had reached, counted before it is removed (complete files only: the failed
        # write's temporary file is gone already)
        files = [f for f in tmp.rglob("*") if f.is_file() and not f.name.startswith(".")] if tmp.exists() else []
        written = sum(f.stat().st_size for f in files)
        shutil.rmtree(tmp, ignore_errors=True)
        if expect and files:
            needed = (f"; at {human_bytes(written / len(files))} a file the {expect} files need about "
                      f"{human_bytes(written / len(files) * expect)}")
        else:
            needed = ""
        kept = f"; the previous {path.name} is intact" if path.exists() else ""
        count = f"{len(files)} file{'' if len(files) == 1 else 's'}"
        raise DiskFullError(f"{path}: {why} in {path.parent} after {count} ({human_bytes(written)}) of "
                            f"this folder{needed} ({_space_now(path.parent)}); the partial folder was removed{kept}; "
                            f"{_ROOM_FIX}") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
