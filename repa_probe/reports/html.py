"""Blocks (:mod:`.document`) -> one self-contained HTML5 file: figures inlined (base64 PNG), a table of
contents of the second-level headings, readable offline."""
from __future__ import annotations

import base64
import html
from pathlib import Path

from repa_probe.reports.document import anchor, code_spans

STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
         "table{border-collapse:collapse;margin:1em 0;font-size:90%}td,th{border-bottom:1px solid #ccc;"
         "padding:2px 10px;text-align:left}th{border-bottom:2px solid #333}img{max-width:100%}"
         "figure{margin:1.5em 0}figcaption{font-size:90%;color:#333}code{background:#f4f4f4}"
         "nav{background:#f7f7f7;padding:.5em 1em;border:1px solid #ddd}"
         "li.finding{margin:.25em 0}td.num{text-align:right;font-variant-numeric:tabular-nums}")


def _inline(text: str) -> str:
    return "".join(f"<code>{html.escape(t)}</code>" if code else html.escape(t) for code, t in code_spans(text))


def _is_number(v) -> bool:
    text = str(v).strip().split(" ")[0]
    try:
        float(text)
        return True
    except ValueError:
        return False


def html_table(rows: list[dict], caption: str | None = None) -> str:
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(
        f"<td{' class=num' if _is_number(r.get(c)) else ''}>{_inline('' if r.get(c) is None else str(r.get(c)))}</td>"
        for c in cols) + "</tr>" for r in rows)
    cap = f"<caption>{_inline(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _toc(blocks: list[tuple]) -> str:
    items = "".join(f"<li><a href='#{anchor(b[1])}'>{html.escape(b[1])}</a></li>" for b in blocks if b[0] == "h2")
    return f"<nav><strong>Contents</strong><ol>{items}</ol></nav>"


def render_html(blocks: list[tuple]) -> str:
    title = next(b[1] for b in blocks if b[0] == "h1")
    out = [f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{STYLE}</style></head><body>"]
    toc_done = False
    for kind, *args in blocks:
        if kind == "h2" and not toc_done:  # the contents after the title and its opening paragraphs
            out.append(_toc(blocks))
            toc_done = True
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind} id='{anchor(args[0])}'>{html.escape(args[0])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline(args[0])}</p>")
        elif kind == "list" and args[0]:
            out.append("<ul>" + "".join(f"<li class='finding'>{_inline(i)}</li>" for i in args[0]) + "</ul>")
        elif kind == "table" and args[0]:
            out.append(html_table(args[0], args[1].get("caption") if len(args) > 1 else None))
        elif kind == "img":
            data = base64.b64encode(Path(args[0]).read_bytes()).decode()
            out.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(args[1])}'>"
                       f"<figcaption>{_inline(args[1])}</figcaption></figure>")
    return "\n".join(out + ["</body></html>"]) + "\n"


def write_html(blocks: list[tuple], path: Path) -> Path:
    path = Path(path)
    path.write_text(render_html(blocks))
    return path
