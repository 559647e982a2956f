"""Offline stand-ins for the ImageNet-weights tests: a loopback HTTP server that serves files from memory, counts
requests and can stop after N of them (so that any later download attempt, from a training job, finds nothing
listening); a release-like state dict; the config and the environment of a run whose jobs cannot download."""

from __future__ import annotations

import contextlib
import hashlib
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import torch
import yaml
from conftest import ROOT, venv_env


class Served:
    """The running server: ``url(name)`` of a file, ``requests`` (paths asked for, in order)."""

    def __init__(self, port: int):
        self.port = port
        self.requests: list[str] = []

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"


@contextlib.contextmanager
def serve(files: dict[str, bytes], max_requests: int | None = None) -> Iterator[Served]:
    """Serve ``files`` (name -> bytes) on 127.0.0.1 (a free port); 404 for anything else.

    Args:
        max_requests: after this many requests the server closes its socket: a later connection is refused.
    """
    state: dict = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server interface
            served = state["served"]
            served.requests.append(self.path)
            body = files.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404)
            else:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            if max_requests is not None and len(served.requests) >= max_requests:
                threading.Thread(target=_close, daemon=True).start()

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state["served"] = Served(srv.server_address[1])
    closed = threading.Event()

    def _close():
        if not closed.is_set():
            closed.set()
            srv.shutdown()
            srv.server_close()

    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield state["served"]
    finally:
        _close()
        thread.join(timeout=10)


def torch_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def hub_name(stem: str, data: bytes) -> str:
    """``<stem>-<first 8 hex of sha256>.pth``: how torchvision and zhanghang1989 name their releases."""
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth"


def resnet18_release_bytes() -> tuple[str, bytes]:
    """A torchvision-format resnet18 state dict (fc included, as the release has it) and its hub-style name."""
    import torchvision

    torch.manual_seed(0)
    data = torch_bytes(torchvision.models.resnet18().state_dict())
    return hub_name("resnet18", data), data


def weights_config(tmp_path: Path, data: str, name: str, url: str) -> Path:
    """config/smoke.yaml with the classifier on resnet18 + weights: imagenet from ``url`` (one training rule)."""
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    cfg["results"] = str(tmp_path / "res")
    cfg["dataset"]["root"] = data
    cfg["classifier"].update(backbone="resnet18", weights="imagenet", output_stride=16, epochs=1)
    cfg["imagenet_weights"] = {"dir": str(tmp_path / "weights"), "sources": {"resnet18": {"file": name, "urls": [url]}}}
    path = tmp_path / "weights.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def offline_env(tmp_path: Path) -> dict:
    """The environment of a run whose jobs could not download if they tried: empty hub caches, every proxy
    variable pointing at a closed port."""
    env = venv_env()
    for var in ("TORCH_HOME", "HF_HOME", "XDG_CACHE_HOME"):
        env[var] = str(tmp_path / "cache" / var.lower())
        Path(env[var]).mkdir(parents=True)
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy"):
        env[var] = "http://127.0.0.1:9"
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1"  # the test's own server (fetch_weights) stays reachable
    env["HF_HUB_OFFLINE"] = "1"
    return env
