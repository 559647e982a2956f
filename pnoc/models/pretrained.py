"""ImageNet weights as files: fetched once, before any job, and verified wherever they are read.

Cluster compute nodes often have no internet, and a download inside every training job (``weights: imagenet``
through torchvision or timm) runs several times at once into one cache. pnoc instead resolves
``weights: imagenet`` to one file per backbone under ``imagenet_weights.dir`` (config.yaml), which the local rule
``fetch_weights`` (``python -m pnoc.data.fetch_weights``) downloads on the submit host and every training
rule takes as input. The files are the releases the peers load: torchvision's ResNets and zhanghang1989's
ResNeSt releases (``resnest269-0cc87c48.pth``, the file PuzzleCAM and P-NOC load, which timm's ``resnest*e``
models load unchanged).

Verification: a file named the torch.hub way, ``<name>-<hex>.pth``, must have a sha256 that starts with
``<hex>`` (torch.hub's ``check_hash``); where a full ``sha256`` is configured, or the fetch recorded one in the
``<file>.sha256`` sidecar (``sha256sum -c`` reads it), the whole digest must match. A file placed by hand is
checked the same way when a stage loads it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import urllib.request
from pathlib import Path

from pnoc.io import DataError

log = logging.getLogger(__name__)

HUB_NAME = re.compile(r"^.+-(?P<prefix>[0-9a-f]{8,64})\.(pth|pt|bin)$")
CHUNK = 1 << 20


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def sidecar(path: str | os.PathLike) -> Path:
    """The ``<file>.sha256`` record beside a weights file (``sha256sum`` format: ``<hex>  <name>``)."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def expected_digest(path: str | os.PathLike, sha256: str | None = None) -> tuple[str | None, str]:
    """What a weights file's sha256 must be: the configured full digest, else the recorded sidecar, else the
    hub prefix of its name; (None, reason) when nothing says.

    Returns:
        (expected hex digest or prefix, where the expectation comes from).
    """
    path = Path(path)
    if sha256:
        return sha256.lower(), "the configured sha256 (imagenet_weights.sources)"
    side = sidecar(path)
    if side.is_file():
        recorded = side.read_text().split()
        if recorded:
            return recorded[0].lower(), str(side)
    m = HUB_NAME.match(path.name)
    if m:
        return m["prefix"], "the hash in its name (torch.hub's <name>-<sha256 prefix>)"
    return None, "no hash known"


def verify(path: str | os.PathLike, sha256: str | None = None) -> str | None:
    """Check a weights file against :func:`expected_digest`.

    Returns:
        the file's sha256, or None when nothing says what it should be (nothing hashed).

    Raises:
        DataError: the digest differs; the message names the file, both digests and the fix.
    """
    path = Path(path)
    want, source = expected_digest(path, sha256)
    if want is None:
        return None
    got = sha256_of(path)
    if not got.startswith(want):
        raise DataError(
            f"{path}: sha256 {got} does not match {want} ({source}): the file is corrupt, truncated or another "
            f"release; delete it (and {sidecar(path).name} if present) and rerun rule fetch_weights, or place the "
            f"right file there by hand")
    return got


def fetch(urls: list[str], out: str | os.PathLike, sha256: str | None = None, timeout: float = 60.0) -> dict:
    """Download the first URL that works into ``out`` (atomically), verify it, and record its sha256 beside it.

    A file already at ``out`` (placed by hand) is verified instead of downloaded.

    Args:
        urls: http(s):// or file:// addresses, tried in order.
        out: the weights file to write.
        sha256: full digest to check (else the hub prefix of the file name).

    Returns:
        {"file", "sha256", "url", "bytes"}.

    Raises:
        DataError: no URL worked, or what arrived fails the check; the message lists each URL with its error
            and says which file to place by hand, where.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_file():
        digest = verify(out, sha256) or sha256_of(out)
        _record(out, digest)
        return {"file": str(out), "sha256": digest, "url": "placed by hand", "bytes": out.stat().st_size}
    failures = []
    for url in urls:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
        tmp = Path(tmp)
        try:
            with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as r:
                shutil.copyfileobj(r, f, CHUNK)
            want, source = expected_digest(out, sha256)
            digest = sha256_of(tmp)
            if want is not None and not digest.startswith(want):
                failures.append(f"{url}: downloaded, but its sha256 {digest} does not match {want} ({source})")
                continue
            os.chmod(tmp, 0o644)
            os.replace(tmp, out)
            _record(out, digest)
            log.info("fetched %s from %s (%d bytes, sha256 %s)", out, url, out.stat().st_size, digest)
            return {"file": str(out), "sha256": digest, "url": url, "bytes": out.stat().st_size}
        except OSError as e:  # URLError, HTTPError, timeouts, refused connections are OSErrors
            failures.append(f"{url}: {getattr(e, 'reason', None) or e}")
        finally:
            if tmp.exists():
                tmp.unlink()
    want, source = expected_digest(out, sha256)
    tried = "\n".join(f"  - {f}" for f in failures) or "  (no URL configured)"
    raise DataError(
        f"{out}: could not fetch the ImageNet weights; tried:\n{tried}\n"
        f"This host cannot download them (compute nodes often have no internet; run snakemake on a host that has, "
        f"e.g. the login node: rule fetch_weights runs there). Or download one of the URLs above elsewhere and place "
        f"the file by hand as\n  {out.resolve()}\n(file name {out.name} in folder {out.parent.resolve()}); it is "
        f"then checked against {want or 'nothing'} ({source}).")


def _record(out: Path, digest: str) -> None:
    """Write the ``<file>.sha256`` sidecar atomically (``sha256sum -c`` reads it)."""
    from pnoc.io import write_text

    write_text(sidecar(out), f"{digest}  {out.name}\n")
