"""Plots as inline SVG strings (matplotlib, Agg backend), for self-contained HTML reports.

Each function returns an ``<svg>`` element (no XML prologue) with text kept as
text, so the page stays small, searchable and renders offline.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _figure(width: float = 6.0, height: float = 4.0):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.figure(figsize=(width, height), dpi=100)


def _rc():
    import matplotlib

    return matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "slmkit", "font.size": 9})


def scatter(points: Sequence[tuple[str, float, float]], xlabel: str, ylabel: str, title: str,
            logx: bool = False, connect: bool = True) -> str:
    """Labelled points ``(label, x, y)``, joined in order when ``connect`` (e.g. stages of a build)."""
    with _rc():
        fig = _figure()
        ax = fig.add_subplot()
        xs = [p[1] for p in points]
        ys = [p[2] for p in points]
        if connect and len(points) > 1:
            ax.plot(xs, ys, color="#9aa", linewidth=1, zorder=1)
        ax.scatter(xs, ys, s=36, color="#2a6fdb", zorder=2)
        for label, x, y in points:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5))
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        return _svg(fig)


def bars(labels: Sequence[str], values: Sequence[float], ylabel: str, title: str,
         annotations: Sequence[str] | None = None) -> str:
    """Vertical bars with optional text above each bar."""
    with _rc():
        fig = _figure(6.0, 3.5)
        ax = fig.add_subplot()
        pos = list(range(len(labels)))
        ax.bar(pos, values, color=["#888" if i == 0 else "#2a6fdb" for i in pos])
        ax.set_xticks(pos, labels)
        for i, v in enumerate(values):
            note = annotations[i] if annotations else f"{v:.3g}"
            ax.annotate(note, (i, v), textcoords="offset points", xytext=(0, 3), ha="center")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        return _svg(fig)


def radar(series: Mapping[str, Mapping[str, float]], title: str, axis_max: float = 1.0) -> str:
    """One polygon per series over the same axes (e.g. trust dimensions of teacher and student, 0..1)."""
    names = list(series)
    axes = list(next(iter(series.values())).keys()) if series else []
    with _rc():
        fig = _figure(5.0, 5.0)
        ax = fig.add_subplot(projection="polar")
        angles = [2 * math.pi * i / len(axes) for i in range(len(axes))]
        colors = ["#888", "#2a6fdb", "#d9822b", "#2b9d5d"]
        for k, name in enumerate(names):
            vals = [float(series[name].get(a, 0.0)) for a in axes]
            ax.plot(angles + angles[:1], vals + vals[:1], color=colors[k % len(colors)], label=name)
            ax.fill(angles + angles[:1], vals + vals[:1], color=colors[k % len(colors)], alpha=0.15)
        ax.set_xticks(angles, axes)
        ax.set_ylim(0, axis_max)
        ax.set_title(title)
        ax.legend(loc="lower right", bbox_to_anchor=(1.15, -0.1))
        return _svg(fig)
