"""Blocks (:mod:`.document`) -> Markdown; figures and files linked relative to the report's directory."""
from __future__ import annotations

import os
from pathlib import Path


def md_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    cell = lambda v: "" if v is None else str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(blocks: list[tuple], root: Path) -> str:
    out = []
    for kind, *args in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + args[0])
        elif kind == "p":
            out.append(args[0])
        elif kind == "list" and args[0]:
            out.append("\n".join(f"- {item}" for item in args[0]))
        elif kind == "table" and args[0]:
            caption = args[1].get("caption") if len(args) > 1 else None
            out.append((f"{caption}\n\n" if caption else "") + md_table(args[0]))
        elif kind == "img":
            rel = Path(os.path.relpath(args[0], root)).as_posix()
            pdf = args[2].get("pdf") if len(args) > 2 else None
            link = f" ([PDF]({Path(os.path.relpath(pdf, root)).as_posix()}))" if pdf else ""
            out.append(f"![{args[1]}]({rel})\n\n*{args[1]}*{link}")
    return "\n\n".join(out) + "\n"


def write_markdown(blocks: list[tuple], path: Path) -> Path:
    path = Path(path)
    path.write_text(render_markdown(blocks, path.parent))
    return path
