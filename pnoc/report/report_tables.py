"""Stage: the tables of the HTML report (``snakemake --report``), one self-contained page per stage.

Snakemake's report shows ``text/html`` results inline and offers anything else
(markdown included) as a download, so every evaluation's tables are rendered here
into HTML pages::

    python -m pnoc.report.report_tables --out-dir D --metrics priors=a/metrics.json priors=b/metrics.json \\
        segmentation=c/metrics.json --summary results/summary.md

writes ``D/priors.html`` (a then b), ``D/segmentation.html``, ``D/summary.html`` and
``D/class_groups.html``. An evaluation is shown by its ``metrics.md`` when it has one
beside its ``metrics.json``, else by a table built from the JSON (mIoU, per-class IoU).
The class-group page has one row per class group and one column per evaluation that
carries a ``class_groups`` table (stage, variant, split), mIoU in %.

Only the markdown this package writes is supported: ``#`` headings, pipe tables,
paragraphs with ``**bold**`` and ``code`` spans.
"""

from __future__ import annotations

import html
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pnoc import cli
from pnoc.io import DataError, read_json, write_text

log = logging.getLogger("pnoc.report.report_tables")

CSS = """body{font-family:sans-serif;font-size:14px;margin:1em}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
code{background:#f4f4f4}"""


@dataclass
class Config:
    """Render the report's per-stage tables as HTML pages."""

    out_dir: Path
    metrics: list[str] = field(default_factory=list)
    summary: Path | None = None


def _inline(s: str) -> str:
    s = html.escape(s)
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_to_html(md: str) -> str:
    """HTML body for the markdown subset written by the pnoc stages."""
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    para: list[str] = []

    def flush():
        if para:
            out.append("<p>" + _inline(" ".join(para)) + "</p>")
            para.clear()

    while i < len(lines):
        line = lines[i]
        m = re.match(r"^(#{1,6})\s+(.*)$", line)
        if m:
            flush()
            level = len(m.group(1))
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
        elif line.lstrip().startswith("|") and i + 1 < len(lines) and re.match(r"^\s*\|[\s:|-]+\|?\s*$", lines[i + 1]):
            flush()
            rows = ["<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in _cells(line)) + "</tr>"]
            i += 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in _cells(lines[i])) + "</tr>")
                i += 1
            out.append("<table>" + "".join(rows) + "</table>")
            continue
        elif not line.strip():
            flush()
        else:
            para.append(line.strip())
        i += 1
    flush()
    return "\n".join(out)


def page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def json_table(m: dict, path: Path) -> str:
    """Markdown for an evaluation without a ``metrics.md``: headline and per-class IoU."""
    md = f"# {m.get('stage', '?')} `{m.get('variant', '?')}` on {m.get('split', '?')}\n\n"
    md += f"mIoU **{float(m['miou']):.4f}**" + (f" (threshold {m['threshold']})" if m.get("threshold") is not None else "")
    md += f"; `{path}`\n\n"
    if isinstance(m.get("per_class_iou"), dict):
        md += "| class | iou |\n|---|---|\n" + "".join(f"| {k} | {float(v):.3f} |\n" for k, v in m["per_class_iou"].items())
    return md


def class_group_table(metrics: list[dict]) -> str:
    """Markdown table: class groups × evaluations (mIoU %, correlations as ρ)."""
    cols, groups, classes = [], {}, {}
    for m in metrics:
        if "class_groups" not in m:
            continue
        col = f"{m['stage']} {m['variant']} {m['split']}"
        cols.append(col)
        for r in m["class_groups"]:
            groups.setdefault(r["group"], {})[col] = r["miou"]
            classes.setdefault(r["group"], r.get("classes", ""))
    if not cols:
        return "# Class groups\n\nNo evaluation in this run carries a class-group table.\n"
    head = "| group | classes | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 2) + "\n"
    body = ""
    for g, vals in groups.items():
        corr = g.startswith("correlation")
        cells = [("" if c not in vals else (f"{vals[c]:.3f}" if corr else f"{100 * vals[c]:.2f}")) for c in cols]
        body += f"| {g} | {classes[g]} | " + " | ".join(cells) + " |\n"
    return ("# Class groups\n\nmIoU (%) of each class group (tertiles of occurrence, relative size and "
            "co-occurrence of the ground truth, paper Table 1) per evaluation; the last rows are the "
            "correlations ρ between a class's IoU and each property.\n\n" + head + body)


def run(cfg: Config) -> dict:
    pages: dict[str, list[Path]] = defaultdict(list)
    for t in cfg.metrics:
        if "=" not in t:
            raise DataError(f"--metrics {t!r}: expected page=metrics.json")
        name, path = t.split("=", 1)
        pages[name].append(Path(path))
    out = Path(cfg.out_dir)
    written, loaded = [], []
    for name, paths in pages.items():
        parts = []
        for p in paths:
            m = read_json(p)
            loaded.append(m)
            md = p.with_suffix(".md")
            parts.append(markdown_to_html(md.read_text() if md.is_file() else json_table(m, p)))
        write_text(out / f"{name}.html", page(name, "\n<hr>\n".join(parts)))
        written.append(name)
    groups = class_group_table(loaded)
    write_text(out / "class_groups.html", page("class groups", markdown_to_html(groups)))
    written.append("class_groups")
    if cfg.summary is not None:
        if not Path(cfg.summary).is_file():
            raise DataError(f"{cfg.summary}: run summary not found; run rule summary first")
        write_text(out / "summary.html", page("summary", markdown_to_html(Path(cfg.summary).read_text())))
        written.append("summary")
    log.info("report tables: %s", ", ".join(written))
    return {"pages": written}


if __name__ == "__main__":
    cli.main(run, Config)
