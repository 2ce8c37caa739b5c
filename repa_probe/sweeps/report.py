"""The study report: ``report.md`` (figures linked) and ``report.html`` (figures inline, base64), one content.

The report is a list of blocks (heading, paragraph, table, figure) rendered twice. It states what was run
(runs and their training settings, analyses and their options, launcher, timings), one summary table per
analysis (for layer-wise analyses: the best block of each checkpoint, timestep and metric; full CSVs linked),
the cross-checkpoint figures, and every missing unit with its error and log.
"""
from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

from repa_probe.sweeps.aggregate import read_table
from repa_probe.sweeps.registry import get_analysis

MAX_ROWS = 120


def best_rows(rows: list[dict]) -> list[dict]:
    """Per (checkpoint, timestep, metric): the block with the highest value; reference rows (no layer) as is."""
    best: dict = {}
    for r in rows:
        if not isinstance(r.get("value"), (int, float)):
            continue
        key = (r.get("checkpoint"), r.get("source"), r.get("timestep"), r.get("metric"))
        if key not in best or (r.get("layer") is not None and r["value"] > best[key]["value"]):
            best[key] = r
    out = [dict(checkpoint=r.get("checkpoint"), step=r.get("step"), t=r.get("timestep"), metric=r.get("metric"),
                block=r.get("layer") if r.get("layer") is not None else "-", value=f"{r['value']:.4f}")
           for r in best.values()]
    return sorted(out, key=lambda r: (str(r["metric"]), str(r["t"]), str(r["checkpoint"])))


def _blocks(root: Path, record: dict) -> list[tuple]:
    cfg = record["config"]
    b: list[tuple] = [("h1", record["title"]),
                      ("p", f"Finished {record['finished']}. Training {record['seconds']['training']} s, analyses "
                            f"{record['seconds']['analyses']} s. Command: `{record['command'] or 'run_study'}`."),
                      ("h2", "What was run")]
    runs = [dict(run=k, **{c: v.get(c) for c in ("model", "depth", "hidden_size", "steps", "batch_size",
                                                   "proj_coeff", "encoder_depth", "encoder", "data", "resolution",
                                                   "trained")}) for k, v in record["runs"].items()]
    b += [("p", "Training runs (`repa.proj_coeff = 0` is the baseline without REPA):"), ("table", runs),
          ("p", f"Checkpoint steps analysed: {cfg['steps'] or 'all'}. Launcher: `{cfg['launcher']['kind']}`. "
                "Time convention: t = 0 clean data, t = 1 pure noise."),
          ("table", [dict(analysis=k, options=json.dumps(v)) for k, v in cfg["analyses"].items()])]
    sweep_dir = Path(record["sweep"]["dir"])
    for name, summary in record["sweep"]["results"].items():
        res = sweep_dir / "results" / name
        b.append(("h2", f"{name}"))
        status = "complete" if summary["complete"] else f"PARTIAL: {len(summary['missing'])} unit(s) missing"
        b.append(("p", f"{summary['done']}/{summary['units']} units ({status}). Full table: "
                       f"`{os.path.relpath(res / summary['files']['csv'], root)}`."))
        rows = read_table(res / summary["files"]["csv"]) if (res / summary["files"]["csv"]).is_file() else []
        table = best_rows(rows) if rows and "layer" in rows[0] else rows
        if table:
            b += [("p", "Best block per checkpoint, timestep and metric:" if "layer" in rows[0] else "Rows:"),
                  ("table", table[:MAX_ROWS])]
        if summary["missing"]:
            b.append(("table", [dict(checkpoint=m["checkpoint"], state=m["state"], error=m["error"], log=m["log"])
                                for m in summary["missing"]]))
        for pattern in get_analysis(name).report_figures:
            for png in sorted((res / "figures").glob(pattern)):
                b.append(("img", png, f"{name}: {png.stem}"))
    b += _correlation_blocks(record["sweep"].get("correlations", []))
    if record["sweep"]["failed"]:
        b += [("h2", "Failed jobs"), ("table", record["sweep"]["failed"])]
    return b


def _correlation_blocks(correlations: list[dict]) -> list[tuple]:
    """Pearson / Spearman with intervals and permutation p-values, and the scatter, per correlation."""
    if not correlations:
        return []
    b: list[tuple] = [("h2", "Correlations across checkpoints")]
    for c in correlations:
        b.append(("p", f"`{c['x']}` vs `{c['y']}`" + (" (last checkpoint of each run)" if c.get("last_only") else "")
                  + (f": not computed: {c['error']}" if c["error"] else ":")))
        if c["error"]:
            continue
        s = c["summary"]
        b.append(("table", [dict(statistic=k, n=s.get("n"), r=_fmt(v.get("r")), ci_low=_fmt(v.get("ci_low")),
                                 ci_high=_fmt(v.get("ci_high")), p_perm=_fmt(v.get("p_perm")))
                            for k, v in s.items() if k in ("pearson", "spearman")]))
        for fig in s["files"]["figures"]:
            if fig.endswith(".png"):
                b.append(("img", Path(c["dir"]) / fig, f"{c['x']} vs {c['y']}: {Path(fig).stem}"))
    return b


def _fmt(v) -> str:
    return "" if v is None else f"{v:.3f}"


def _md_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    cell = lambda v: "" if v is None else str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape('' if r.get(c) is None else str(r.get(c)))}</td>"
                                    for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_markdown(blocks: list[tuple], root: Path) -> str:
    out = []
    for kind, *args in blocks:
        if kind in ("h1", "h2"):
            out.append(("# " if kind == "h1" else "## ") + args[0])
        elif kind == "p":
            out.append(args[0])
        elif kind == "table" and args[0]:
            out.append(_md_table(args[0]))
        elif kind == "img":
            out.append(f"![{args[1]}]({Path(os.path.relpath(args[0], root)).as_posix()})")
    return "\n\n".join(out) + "\n"


def render_html(blocks: list[tuple]) -> str:
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}table{border-collapse:"
             "collapse;margin:1em 0;font-size:90%}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
             "img{max-width:100%}figure{margin:1em 0}code{background:#f4f4f4}")
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(blocks[0][1])}</title>"
           f"<style>{style}</style></head><body>"]
    for kind, *args in blocks:
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{html.escape(args[0])}</{kind}>")
        elif kind == "p":
            text = html.escape(args[0]).split("`")
            out.append("<p>" + "".join(f"<code>{t}</code>" if i % 2 else t for i, t in enumerate(text)) + "</p>")
        elif kind == "table" and args[0]:
            out.append(_html_table(args[0]))
        elif kind == "img":
            data = base64.b64encode(Path(args[0]).read_bytes()).decode()
            out.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(args[1])}'>"
                       f"<figcaption>{html.escape(args[1])}</figcaption></figure>")
    return "\n".join(out + ["</body></html>"]) + "\n"


def write_report(root: Path, record: dict) -> list[Path]:
    """``root/report.md`` and ``root/report.html`` from a study record (see :func:`repa_probe.sweeps.study.run_study`)."""
    blocks = _blocks(Path(root), record)
    md, page = Path(root) / "report.md", Path(root) / "report.html"
    md.write_text(render_markdown(blocks, Path(root)))
    page.write_text(render_html(blocks))
    return [md, page]
