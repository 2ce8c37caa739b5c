"""A report as a list of blocks, rendered to Markdown, HTML and LaTeX by :mod:`.markdown`, :mod:`.html` and
:mod:`.latex` (one content, three formats).

Blocks are tuples: ``("h1" | "h2" | "h3", text)``, ``("p", text)`` (text with ```code``` spans),
``("list", [text, ...])``, ``("table", rows: list[dict], meta)`` and ``("img", png: Path, caption, meta)``.
``meta`` is a dict: for tables ``name`` (``tables/<name>.{csv,tex}``) and ``caption``; for figures ``pdf``
(the vector file beside the PNG) and ``width`` (``"column"`` or ``"page"``).
"""
from __future__ import annotations

import re
from pathlib import Path


def heading(text: str, level: int = 2) -> tuple:
    return (f"h{level}", text)


def para(text: str) -> tuple:
    return ("p", text)


def bullets(items: list[str]) -> tuple:
    return ("list", list(items))


def table(rows: list[dict], name: str | None = None, caption: str | None = None) -> tuple:
    return ("table", rows, dict(name=name, caption=caption))


def figure(png, caption: str, width: str = "page") -> tuple:
    png = Path(png)
    pdf = png.with_suffix(".pdf")
    return ("img", png, caption, dict(pdf=pdf if pdf.is_file() else None, width=width))


def anchor(text: str) -> str:
    """HTML id of a heading: ``"Findings: runs vs baseline"`` -> ``"findings-runs-vs-baseline"``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def code_spans(text: str) -> list[tuple[bool, str]]:
    """``"a `b` c"`` -> ``[(False, "a "), (True, "b"), (False, " c")]``."""
    return [(i % 2 == 1, part) for i, part in enumerate(text.split("`"))]
