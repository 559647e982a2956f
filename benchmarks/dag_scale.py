"""Benchmark: Snakemake's orchestration at VOC's and COCO 2014's real sizes (issue 25).

Lays out a dataset tree of the real counts in a work folder, with the peers' structures of
``tests/peer_formats.py``:

* **COCO 2014** (``config/coco14.yaml``): ``train2014/COCO_train2014_<12d>.jpg`` (82,783) and
  ``val2014/COCO_val2014_<12d>.jpg`` (40,504), the official zips' layout; ``coco_seg_anno/<12d>.png``
  (RIB's / PNOC's masks: class indices 0..80, PNOC's void 81 on the borders); ``cls_labels_coco.npy``
  (``np.save`` of ``{int: float32 (80,)}``, RIB's keys); lists ``train2014.txt`` / ``val2014.txt`` of
  12-digit numbers (RIB's).
* **VOC 2012** (``config/voc12.yaml``): IRN's: ``JPEGImages/<id>.jpg``, SBD's gray masks in
  ``SegmentationClassAug/`` (train_aug 10,582 and val 1,449), VOC's palette masks in ``SegmentationClass/``
  (train 1,464 inside train_aug, and val), ``ImageSets/Segmentation/{train_aug,train,val}.txt`` and IRN's
  ``cls_labels.npy`` (protocol 2, ``numpy.int32`` keys such as ``2007000032``); ``--voc-labels xml``
  writes ``Annotations/<id>.xml`` instead.

Every image is one real JPEG (``--image-size``, by default the dataset's typical size: COCO 640x480, VOC
500x375) and every mask one real PNG of the same size, each written once and hard-linked N times (a new copy
every 60,000 links, ext4's limit): the tree costs a few dozen MB of disk, and the check decodes every file as
it would decode the real ones (but from the page cache: the disk's read time is not measured). Then, for each
``--repo`` (a checkout: its Snakefile, config and pnoc run; two of them compare designs in one run), it times
with the peak memory of Snakemake's process (``VmHWM``) and of its whole process tree (the sum of the RSS,
polled every 0.1 s) and the CPU seconds of the tree (the figure that the load of a shared machine disturbs
least), each dry run and up-to-date phase ``--repeats`` times:

1. ``dry run``: ``snakemake -n --configfile config/<dataset>.yaml config/gpus4.yaml <overlay>`` (the
   overlay sets ``dataset.root`` and ``results``) on a fresh results folder: the whole chain's DAG, with
   ``gpus4.yaml``'s 8 shards per per-image rule;
2. ``check``: ``snakemake <every manifest the dry run plans> --cores 2``: the ``check_dataset`` jobs, once.
   Then every other output of the dry run is made a stand-in (an empty file or folder, one mtime): the chain
   as if it had run, so that the dry runs below show what a change reruns;
3. ``up-to-date dry run`` (the whole chain) and ``up-to-date run`` (``snakemake`` of the manifests): nothing
   to do;
4. ``changed val mask: dry run``: one val mask replaced with other bytes. It must plan its check and exactly
   what a new val masks manifest plans (the reference: the manifest itself rewritten, then put back);
   ``touched val mask: dry run``: the same bytes with a new mtime: nothing to do. The original file is put
   back (the same link: its bytes and mtime). ``touched label file: dry run``: the label file's mtime set to
   now (its plan is reported, not required: COCO's is 44 MB, above Snakemake's 1 MB limit for checksums of
   inputs), then put back.

A phase whose plan is not the expected one stops the run with the log's path. Prints a markdown table (what,
seconds, CPU seconds, peak RSS, jobs, target, met?) and writes the JSON (``--out``). The targets are those of
issue 25 for COCO on 2 cores; VOC's rows are for comparison. ``--phases dry,check`` stops after step 3.

    python benchmarks/dag_scale.py --work /tmp/dag_scale [--scale 0.01] [--datasets coco14,voc12] \\
        [--repo before=/path/to/old/checkout --repo after=.]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import yaml  # noqa: E402
from peer_formats import gray_png, jpeg, labels_of, palette_png, save_protocol2, scene  # noqa: E402

from pnoc.data.datasets import COCO_CLASSES, COCO_VOID, VOC_CLASSES  # noqa: E402

COUNTS = {
    "coco14": {"train2014": 82783, "val2014": 40504},
    "voc12": {"train_aug": 10582, "train": 1464, "val": 1449},
}
"""Images per split at scale 1 (VOC's train is inside train_aug)."""
SIZES = {"coco14": (480, 640), "voc12": (375, 500)}
"""(H, W) of the one image: the typical size of each dataset."""
TARGETS = {("coco14", "dry run"): 60, ("coco14", "check"): 600, ("coco14", "up-to-date dry run"): 30,
           ("coco14", "up-to-date run"): 30}
"""Seconds (issue 25: COCO on 2 cores)."""
MARK = ".dag_scale.json"
"""What a tree was built with (a tree of other counts or size is rebuilt)."""


# ------------------------------------------------------------------------------------------------ the trees


LINKS_PER_INODE = 60000
"""Hard links per copy of a prototype file (ext4 allows 65,000 links to one inode)."""


def _link(src: Path, dst: Path) -> None:
    """``dst`` as a hard link of ``src`` (of a fresh copy of ``src``'s bytes every LINKS_PER_INODE links)."""
    st = src.stat()
    if st.st_nlink >= LINKS_PER_INODE:
        spare = src.with_name(f"{src.name}.{st.st_nlink}.{time.monotonic_ns()}")
        shutil.copy2(src, spare)
        os.replace(spare, src)  # src is now a new inode: its links so far keep the old one
    try:
        os.link(src, dst)
    except FileExistsError:
        pass


def _proto(hw: tuple[int, int], n_classes: int, seed: int = 0):
    """The one image and mask (and their labels) every entry of the tree links to."""
    rng = np.random.default_rng(seed)
    while True:
        img, mask = scene(rng, hw, n_classes)
        if labels_of(mask, n_classes).any():
            break
    return img, mask, labels_of(mask, n_classes)


def build_coco(root: Path, scale: float, hw: tuple[int, int]) -> dict[str, int]:
    """COCO 2014 as the official zips + RIB's/PNOC's masks and label file, ``scale`` x the real counts."""
    counts = {s: max(1, round(n * scale)) for s, n in COUNTS["coco14"].items()}
    img, mask, y = _proto(hw, len(COCO_CLASSES))
    proto = root / ".proto"
    jpeg(proto / "image.jpg", img)
    stored = mask.copy()
    stored[stored == 255] = COCO_VOID  # PNOC's void index on the borders
    gray_png(proto / "mask.png", stored)
    (root / "coco_seg_anno").mkdir(parents=True, exist_ok=True)
    labels = {}
    # COCO's image numbers are unique over train and val: train 1, 8, 15, ..., val 4, 11, 18, ...
    for split, n in counts.items():
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        nums = [(1 if split == "train2014" else 4) + 7 * k for k in range(n)]
        for num in nums:
            _link(proto / "image.jpg", folder / f"COCO_{split}_{num:012d}.jpg")
            _link(proto / "mask.png", root / "coco_seg_anno" / f"{num:012d}.png")
            labels[num] = y.copy()  # one array each, as in the real file (pickle would share one)
        (root / f"{split}.txt").write_text("".join(f"{num:012d}\n" for num in nums))
    np.save(root / "cls_labels_coco.npy", labels, allow_pickle=True)
    return counts


def _voc_xml(path: Path, labels: np.ndarray) -> None:
    objects = "".join(f"<object><name>{VOC_CLASSES[c]}</name></object>" for c in np.flatnonzero(labels))
    path.write_text(f"<annotation>{objects}</annotation>")


def build_voc(root: Path, scale: float, hw: tuple[int, int], labels_from: str = "npy") -> dict[str, int]:
    """VOC 2012 as IRN's users hold it (SBD's masks beside VOC's), ``scale`` x the real counts."""
    counts = {s: max(1, round(n * scale)) for s, n in COUNTS["voc12"].items()}
    counts["train"] = min(counts["train"], counts["train_aug"])
    img, mask, y = _proto(hw, len(VOC_CLASSES))
    proto = root / ".proto"
    jpeg(proto / "image.jpg", img)
    gray_png(proto / "gray.png", mask)
    palette_png(proto / "palette.png", mask)
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    # VOC's ids are <year>_<6 digits>: train_aug 2008_..., val 2007_...; train = the first of train_aug
    ids = {"train_aug": [f"{2008 + k // 900000}_{k % 900000:06d}" for k in range(counts["train_aug"])],
           "val": [f"2007_{k:06d}" for k in range(counts["val"])]}
    ids["train"] = ids["train_aug"][: counts["train"]]
    voc = set(ids["train"]) | set(ids["val"])
    if labels_from == "xml":
        (root / "Annotations").mkdir(exist_ok=True)
        _voc_xml(proto / "annotation.xml", y)
    for image_id in ids["train_aug"] + ids["val"]:
        _link(proto / "image.jpg", root / "JPEGImages" / f"{image_id}.jpg")
        _link(proto / "gray.png", root / "SegmentationClassAug" / f"{image_id}.png")
        if image_id in voc:
            _link(proto / "palette.png", root / "SegmentationClass" / f"{image_id}.png")
        if labels_from == "xml":
            _link(proto / "annotation.xml", root / "Annotations" / f"{image_id}.xml")
    for split, lst in ids.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in lst))
    if labels_from == "npy":
        # IRN's voc12/cls_labels.npy: {np.int32(2007000032): float32 vector}, protocol 2, numpy 1.x names
        save_protocol2(root / "cls_labels.npy",
                       {np.int32(int(i.replace("_", ""))): y.copy() for i in ids["train_aug"] + ids["val"]})
    return counts


def build(name: str, root: Path, scale: float, hw: tuple[int, int], voc_labels: str = "npy") -> dict:
    """The tree of ``name`` in ``root`` (reused when it was built with the same settings); its description."""
    want = {"dataset": name, "scale": scale, "hw": list(hw), "voc_labels": voc_labels if name == "voc12" else None}
    mark = root / MARK
    if mark.is_file():
        have = json.loads(mark.read_text())
        if {k: have.get(k) for k in want} == want:
            return have
    if mark.is_file():
        shutil.rmtree(root)  # a tree of this script's, of other settings
    elif root.exists() and any(root.iterdir()):
        raise SystemExit(f"{root}: not a tree of this script (no {MARK}) and not empty; give another --work")
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    counts = build_coco(root, scale, hw) if name == "coco14" else build_voc(root, scale, hw, voc_labels)
    files = sum(1 for _ in root.rglob("*") if _.is_file())
    desc = {**want, "counts": counts, "files": files, "built_s": round(time.perf_counter() - t0, 1),
            "disk_bytes": _disk_bytes(root)}
    mark.write_text(json.dumps(desc))
    return desc


def _disk_bytes(root: Path) -> int:
    """Bytes the tree holds on disk (each inode once: the hard links share theirs)."""
    seen, total = set(), 0
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, n))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total


# ------------------------------------------------------------------------------------------------ timing


class Peak:
    """Polls a process tree: the peak of the main process (its ``VmHWM``) and of the sum of the tree's RSS."""

    def __init__(self, pid: int, every: float = 0.1):
        self.pid, self.every = pid, every
        self.main_kb = self.tree_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    @staticmethod
    def _hwm_kb(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def _poll(self) -> None:
        try:
            proc = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            self.main_kb = max(self.main_kb, self._hwm_kb(self.pid))
            total = 0
            try:
                procs = [proc, *proc.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.tree_kb = max(self.tree_kb, total // 1024)
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def snakemake_env(repo: Path) -> dict:
    """The environment of the timed Snakemake: ``repo``'s pnoc first on the path (the rules' ``python -m pnoc...``
    import it), the venv's bin first on PATH, and no SLURM controller to wait for (as tests/conftest.py)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(repo) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if shutil.which("scontrol"):
        env["SLURM_CONF"] = os.devnull
    return env


def timed(cmd: list[str], cwd: Path, env: dict, log: Path) -> dict:
    """Run ``cmd``; its wall seconds, peak memory (MB) and exit status; its output goes to ``log``."""
    with open(log, "w") as out:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        peak = Peak(p.pid)
        rc = p.wait()
        dt = time.perf_counter() - t0
        peak.stop()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the process tree (its processes that were waited for: all, once it ended): on a machine
    # shared with other work, what the wall time would be on idle cores is about cpu_s / cores at best
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"s": round(dt, 2), "cpu_s": round(cpu, 2), "rss_mb": round(peak.main_kb / 1024, 1),
            "tree_rss_mb": round(peak.tree_kb / 1024, 1), "rc": rc}


def job_stats(output: str) -> dict[str, int]:
    """The "Job stats:" table of a snakemake run or dry run: rule -> jobs (no ``total``); {} when nothing to do."""
    m = re.search(r"^Job stats:\n.*?\n-+\s+-+\n(.*?)(?:\n\s*\n|\Z)", output, re.M | re.S)
    if not m:
        return {}
    out = {}
    for line in m.group(1).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            out[parts[0]] = int(parts[1])
    return out


def planned_manifests(output: str) -> list[str]:
    """The check_dataset jobs of a dry run, as ``<split>/<kind>``."""
    return sorted(set(f"{s}/{k}" for s, k in re.findall(r"wildcards: split=(\w+), kind=(\w+)", output)))


class Bench:
    def __init__(self, args, repo: Path, label: str):
        self.args, self.repo, self.label = args, repo, label
        self.env = snakemake_env(repo)
        self.exe = str(Path(sys.executable).parent / "snakemake")
        self.rows: list[dict] = []

    def run(self, name: str, root: Path) -> dict:
        work = self.args.work / f"{self.label}-{name}"
        work.mkdir(parents=True, exist_ok=True)
        results = work / "results"
        overlay = work / "overlay.yaml"
        overlay.write_text(yaml.safe_dump({"results": str(results), "dataset": {"root": str(root)}}))
        base = ["--snakefile", str(self.repo / "Snakefile"), "--configfile", str(self.repo / "config" / f"{name}.yaml"),
                str(self.repo / "config" / "gpus4.yaml"), str(overlay)]
        out = {"dataset": name, "repo": str(self.repo), "label": self.label, "phases": {}}

        def phase(what: str, args: list[str], repeats: int, fresh: bool = False, expect=None) -> dict:
            runs = []
            for k in range(repeats):
                if fresh:
                    shutil.rmtree(results, ignore_errors=True)
                    shutil.rmtree(work / ".snakemake", ignore_errors=True)
                stem = re.sub(r"\W+", "_", what).strip("_")
                log = work / f"{stem}.{k}.log"
                r = timed([self.exe, *args, *base], work, self.env, log)
                text = log.read_text()
                r["jobs"] = job_stats(text)
                r["nothing_to_do"] = "Nothing to be done" in text
                runs.append(r)
                if r["rc"] != 0:
                    raise RuntimeError(f"{self.label} {name} {what}: snakemake failed ({r['rc']}), see {log}:\n"
                                       f"{text[-3000:]}")
                if expect is not None:
                    problem = expect(r, text)
                    if problem:
                        raise RuntimeError(f"{self.label} {name} {what}: {problem}; see {log}")
                print(f"  {self.label} {name} {what} [{k + 1}/{repeats}]: {r['s']:.1f} s (CPU {r['cpu_s']:.1f} s), "
                      f"{r['rss_mb']:.0f} MB "
                      f"(tree {r['tree_rss_mb']:.0f} MB), load {os.getloadavg()[0]:.1f}", flush=True)
            s = sorted(r["s"] for r in runs)
            cpu = sorted(r["cpu_s"] for r in runs)
            summary = {"s": s[len(s) // 2], "s_all": [r["s"] for r in runs], "cpu_s": cpu[len(cpu) // 2],
                       "rss_mb": max(r["rss_mb"] for r in runs), "tree_rss_mb": max(r["tree_rss_mb"] for r in runs),
                       "jobs": runs[-1]["jobs"], "nothing_to_do": runs[-1]["nothing_to_do"],
                       "load_before": load, "target_s": TARGETS.get((name, what))}
            out["phases"][what] = summary
            return summary

        load = os.getloadavg()[0]
        dry = phase("dry run", ["-n"], self.args.repeats, fresh=True)
        text = (work / "dry_run.0.log").read_text()
        manifests = planned_manifests(text)
        out["manifests"] = manifests
        targets = [str(results / "dataset" / "manifest" / f"{m}.json") for m in manifests]
        out["dag_jobs"] = sum(dry["jobs"].values())

        def nothing(r, text):
            return None if r["nothing_to_do"] else f"expected nothing to do, got {r['jobs']}"

        if "check" not in self.args.phases:
            return out
        load = os.getloadavg()[0]
        phase("check", [*targets, "--cores", str(self.args.cores)], 1,
              expect=lambda r, t: None if r["jobs"].get("check_dataset") == len(targets) else
              f"expected {len(targets)} check_dataset jobs, got {r['jobs']}")
        out["stand_in_outputs"] = stand_in_chain(text, {str(Path(t)) for t in targets}, work)
        load = os.getloadavg()[0]
        phase("up-to-date dry run", ["-n"], self.args.repeats, expect=nothing)
        load = os.getloadavg()[0]
        phase("up-to-date run", [*targets, "--cores", str(self.args.cores)], self.args.repeats, expect=nothing)

        if "rerun" not in self.args.phases:
            return out
        # what a new val masks manifest reruns (the reference of an exact rerun): the manifest rewritten with other
        # bytes, then put back with its bytes and mtime
        val_manifest = results / "dataset" / "manifest" / val_split(name) / "masks.json"
        st, data = val_manifest.stat(), val_manifest.read_bytes()
        val_manifest.write_bytes(data + b" ")
        try:
            timed([self.exe, "-n", *base], work, self.env, work / "reference.log")
            reference = job_stats((work / "reference.log").read_text())
        finally:
            val_manifest.write_bytes(data)
            os.utime(val_manifest, ns=(st.st_atime_ns, st.st_mtime_ns))
        expected = {"check_dataset": 1, **reference}
        out["val_mask_readers"] = reference

        # one val mask: other bytes (a new file: the tree's files share inodes), then the same bytes with a new mtime
        val = _a_val_mask(name, root)
        original = val.with_name(val.name + ".dag_scale_orig")
        os.replace(val, original)
        try:
            from PIL import Image

            with Image.open(original) as im:
                a, pal, mode = np.array(im), im.getpalette(), im.mode
            a[:2, :2] = 255  # a corrected corner
            changed = Image.fromarray(a, mode=mode)
            if pal:
                changed.putpalette(pal)
            changed.save(val)

            def exact(r, text):
                if r["jobs"] != expected:
                    return (f"a changed val mask should plan its check and what reads the val masks "
                            f"({expected}), got {r['jobs']}")
                return None

            load = os.getloadavg()[0]
            phase("changed val mask: dry run", ["-n"], self.args.repeats, expect=exact)
            val.unlink()
            shutil.copyfile(original, val)  # the same bytes, a new mtime
            load = os.getloadavg()[0]
            phase("touched val mask: dry run", ["-n"], self.args.repeats, expect=nothing)
        finally:
            os.replace(original, val)  # the original link: its bytes and mtime
        # the label file touched (a file of every check; COCO's is 44 MB, above Snakemake's 1 MB checksum limit)
        labels = root / ("cls_labels_coco.npy" if name == "coco14" else "cls_labels.npy")
        if labels.is_file():
            st = labels.stat()
            os.utime(labels)
            try:
                load = os.getloadavg()[0]
                phase("touched label file: dry run", ["-n"], self.args.repeats)
            finally:
                os.utime(labels, ns=(st.st_atime_ns, st.st_mtime_ns))
        return out


def val_split(name: str) -> str:
    return "val2014" if name == "coco14" else "val"


FILE_SUFFIXES = (".json", ".md", ".pt", ".pth", ".html", ".txt", ".csv", ".npz", ".png")


def stand_in_chain(dry_run: str, skip: set[str], workdir: Path) -> int:
    """Stand-ins for every output of a dry run but ``skip`` (empty files; folders where the path has no file
    suffix), all with one mtime: the chain as if it had run, so that a later dry run says what a change reruns.
    The shard folders (temporary) are left out, as after a real run. Returns the count."""
    paths = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", dry_run):
        m = re.match(r"(?:local)?rule (\w+):", block)
        o = re.search(r"^\s+output: (.*)$", block, re.M)
        if not m or not o:
            continue
        paths += [Path(p) for p in o.group(1).split(", ") if ".shards" not in p and p not in skip]
    # a relative output (the ImageNet weights' `weights/<file>`) is relative to snakemake's working folder, not to ours
    paths = [p if p.is_absolute() else workdir / p for p in paths]
    now = time.time_ns()
    for p in paths:
        if p.suffix in FILE_SUFFIXES:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.touch()
        else:
            p.mkdir(parents=True, exist_ok=True)
    for p in paths:
        os.utime(p, ns=(now, now))
    return len(paths)


def _a_val_mask(name: str, root: Path) -> Path:
    if name == "coco14":
        num = int((root / "val2014.txt").read_text().split()[0])
        return root / "coco_seg_anno" / f"{num:012d}.png"
    image_id = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    return root / "SegmentationClass" / f"{image_id}.png"


# ------------------------------------------------------------------------------------------------ report


def table(results: list[dict]) -> str:
    lines = ["| what | seconds: median (runs) | CPU s | peak RSS snakemake / tree (MB) | jobs | target | met? |",
             "|---|---:|---:|---:|---|---:|---|"]
    for res in results:
        for what, p in res["phases"].items():
            jobs = "nothing to do" if p["nothing_to_do"] else (
                f"{sum(p['jobs'].values())}" + (f" ({p['jobs'].get('check_dataset', 0)} check_dataset)"
                                                if what != "check" else " check_dataset"))
            target = p["target_s"]
            met = "–" if target is None else ("yes" if p["s"] <= target else "**no**")
            runs = "/".join(f"{s:.1f}" for s in p["s_all"])
            lines.append(f"| {res['label']} {res['dataset']}: {what} | {p['s']:.1f} ({runs}) | {p['cpu_s']:.1f} | "
                         f"{p['rss_mb']:.0f} / {p['tree_rss_mb']:.0f} | {jobs} | "
                         f"{'–' if target is None else f'≤ {target} s'} | {met} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="work folder (dataset trees, results, logs)")
    ap.add_argument("--scale", type=float, default=1.0, help="share of the real image counts (0.01: a quick run)")
    ap.add_argument("--datasets", default="coco14,voc12", help="comma-separated: coco14, voc12")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each dry run / up-to-date phase (the check: one)")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--phases", default="dry,check,rerun",
                    help="dry: the dry run; check: + the check and the up-to-date runs; rerun: + the changed and "
                         "touched val mask")
    ap.add_argument("--image-size", default=None, help="HxW of the one image (default: COCO 480x640, VOC 375x500)")
    ap.add_argument("--voc-labels", choices=("npy", "xml"), default="npy", help="IRN's cls_labels.npy, or VOC XML")
    ap.add_argument("--repo", action="append", default=None, metavar="[LABEL=]PATH",
                    help="checkout whose Snakefile, config and pnoc run (repeat to compare; default: this one)")
    ap.add_argument("--out", type=Path, default=None, help="JSON to write (default: <work>/dag_scale.json)")
    args = ap.parse_args(argv)
    args.work = args.work.resolve()
    args.phases = set(args.phases.split(","))
    repos = []
    for spec in args.repo or [f"this={ROOT}"]:
        label, _, path = spec.rpartition("=")
        repos.append((label or Path(path).name, Path(path).resolve()))
    hw = tuple(int(v) for v in args.image_size.split("x")) if args.image_size else None
    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "snakemake": subprocess.run([str(Path(sys.executable).parent / "snakemake"), "--version"],
                                        capture_output=True, text=True).stdout.strip(),
            "scale": args.scale, "load_at_start": os.getloadavg()}
    results, trees = [], {}
    for name in args.datasets.split(","):
        root = args.work / name
        tree = build(name, root, args.scale, hw or SIZES[name], args.voc_labels)
        trees[name] = tree
        print(f"{name}: {tree['counts']} images, {tree['files']} files, {tree['disk_bytes'] / 1e6:.0f} MB on disk "
              f"(built in {tree['built_s']} s)", flush=True)
        for label, repo in repos:
            results.append(Bench(args, repo, label).run(name, root))
    md = table(results)
    print(md)
    out = args.out or args.work / "dag_scale.json"
    out.write_text(json.dumps({"machine": info, "trees": trees, "results": results, "table": md,
                               "load_at_end": os.getloadavg()}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
