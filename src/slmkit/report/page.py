"""A self-contained HTML page: inline CSS, inline SVG, no scripts and no external resources."""

from __future__ import annotations

import html
from collections.abc import Sequence

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:70rem;padding:0 1rem;color:#222}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
pre{background:#f6f8fa;padding:.75rem;overflow:auto;font-size:.85rem}
.plots{display:flex;flex-wrap:wrap;gap:1rem}.plot{flex:1 1 28rem}.plot svg{max-width:100%;height:auto}
.note{color:#666;font-size:.85rem}
.warning{color:#a4000f;background:#fff1f0;border:1px solid #f3b3b3;padding:.4rem .6rem}
.recommended{background:#f0f7ff;border-left:4px solid #d62728;padding:.4rem .6rem}
table.candidates td:first-child{color:#d62728;font-size:1.1rem}
table.candidates{font-size:.8rem}.wide{overflow-x:auto}
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def table(headers: Sequence[str], rows: Sequence[Sequence], cls: str = "") -> str:
    """An HTML table; cells are escaped (pass pre-formatted strings)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def figure(svg: str, caption: str, ident: str) -> str:
    """A plot (trusted SVG from :mod:`slmkit.report.charts`) with a caption."""
    return f'<figure class="plot" id="{esc(ident)}">{svg}<figcaption class="note">{esc(caption)}</figcaption></figure>'


def section(title: str, body: str, ident: str = "") -> str:
    idattr = f' id="{esc(ident)}"' if ident else ""
    return f"<section{idattr}><h2>{esc(title)}</h2>{body}</section>"


def page(title: str, sections: Sequence[str], subtitle: str = "") -> str:
    sub = f'<p class="note">{esc(subtitle)}</p>' if subtitle else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>"
        f"<body><h1>{esc(title)}</h1>{sub}{''.join(sections)}</body></html>\n"
    )
