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


def _label(ax, xlabel: str, ylabel: str, title: str, logx: bool) -> None:
    """Axis labels, title, light grid, and a log x axis when ``logx``."""
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)


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
        _label(ax, xlabel, ylabel, title, logx)
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


#: label positions tried around a point, in points: (dx, dy, horizontal alignment)
_OFFSETS = [(7, 5, "left"), (7, -12, "left"), (-7, 5, "right"), (-7, -12, "right"), (0, 10, "center"), (0, -18, "center")]


def _overlaps(box, boxes, pad: float = 2.0) -> bool:
    return any(box.x0 - pad < b.x1 and b.x0 - pad < box.x1 and box.y0 - pad < b.y1 and b.y0 - pad < box.y1 for b in boxes)


def place_labels(fig, ax, points: Sequence[tuple[str, float, float]]) -> list:
    """Annotate each ``(label, x, y)`` where its text overlaps no other label and no marker.

    Tries positions next to the point first, then further out along 16 directions (with a leader
    line). A label that finds no free place becomes a numbered tag ``(k)`` placed the same way, and
    the tags are spelled out under the chart. Returns the labels' bounding boxes in display units.
    """
    import math

    from matplotlib.transforms import Bbox

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    dpi = fig.dpi / 72.0
    taken = []
    for _, x, y in points:  # every marker is an obstacle (a 9-point square)
        px, py = ax.transData.transform((x, y))
        taken.append(Bbox.from_extents(px - 4.5 * dpi, py - 4.5 * dpi, px + 4.5 * dpi, py + 4.5 * dpi))
    spots = list(_OFFSETS)
    for radius in (26, 40, 56, 74, 96, 120, 150):
        for k in range(16):
            a = 2 * math.pi * k / 16
            dx, dy = radius * math.cos(a), radius * math.sin(a)
            spots.append((dx, dy, "left" if dx > 4 else "right" if dx < -4 else "center"))

    def place(text: str, x: float, y: float):
        for dx, dy, ha in spots:
            far = abs(dx) > 12 or abs(dy) > 20
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, va="bottom",
                              fontsize=8, arrowprops={"arrowstyle": "-", "color": "#999", "lw": 0.6} if far else None)
            box = ann.get_window_extent(renderer)
            inside = box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1
            if inside and not _overlaps(box, taken + labels):
                return box
            ann.remove()
        return None

    labels: list = []
    tags: list[str] = []
    for label, x, y in points:
        box = place(label, x, y)
        if box is None:
            tags.append(label)
            box = place(f"({len(tags)})", x, y)
        if box is not None:
            labels.append(box)
    if tags:
        ax.text(0.0, -0.3, "\n".join(f"({i}) {t}" for i, t in enumerate(tags, 1)), transform=ax.transAxes, fontsize=8,
                va="top")
    return labels


def front_2d(points: Sequence[Mapping], higher_x: bool = False) -> list[Mapping]:
    """The points no other point beats on both axes (lower y, and lower x or higher x), sorted by x."""
    sign = -1 if higher_x else 1

    def beats(a, b):
        return sign * a["x"] <= sign * b["x"] and a["y"] <= b["y"] and (a["x"] != b["x"] or a["y"] != b["y"])

    return sorted((p for p in points if not any(beats(o, p) for o in points if o is not p)), key=lambda p: p["x"])


def pareto(points: Sequence[Mapping], xlabel: str, ylabel: str, title: str, logx: bool = False,
           higher_x: bool = False, boxes: list | None = None) -> str:
    """Candidates as points: ``{"label", "x", "y", "yerr", "baseline", "recommended"}``.

    Baselines are grey squares, the run's artefacts blue circles, the recommendation a red star;
    the front of this chart (lower y and lower x, or higher x with ``higher_x``) is a dashed step
    line. The y axis (KL divergence, 0 for the teacher) is symlog, so zero and values over several
    decades share it. Labels never overlap (``place_labels``); their boxes are appended to
    ``boxes`` when given.
    """
    with _rc():
        fig = _figure(6.4, 4.4)
        ax = fig.add_subplot()
        pos = [p["y"] for p in points if p["y"] and p["y"] > 0]
        if pos:
            ax.set_yscale("symlog", linthresh=min(pos) / 2, linscale=0.4)
        front = front_2d(points, higher_x)
        if len(front) > 1:
            ax.step([p["x"] for p in front], [p["y"] for p in front], where="pre" if higher_x else "post", color="#bbb",
                    linewidth=1, zorder=1, linestyle="--", label="front (this chart)")
        for kind, style in (("baseline", dict(marker="s", color="#888", label="teacher and baselines")),
                            ("artefact", dict(marker="o", color="#2a6fdb", label="this run's artefacts"))):
            sel = [p for p in points if (p.get("baseline") if kind == "baseline" else not p.get("baseline"))]
            if sel:
                ax.errorbar([p["x"] for p in sel], [p["y"] for p in sel], yerr=[p.get("yerr") or 0 for p in sel],
                            linestyle="none", markersize=6, capsize=2, zorder=2, **style)
        rec = [p for p in points if p.get("recommended")]
        if rec:
            ax.scatter([rec[0]["x"]], [rec[0]["y"]], marker="*", s=260, color="#d62728", edgecolor="black", linewidth=0.6,
                       zorder=3, label="recommended")
        _label(ax, xlabel, ylabel, title, logx)
        ax.margins(x=0.25, y=0.2)
        tops = [p["y"] + (p.get("yerr") or 0) for p in points]
        if tops and max(tops) > 0:  # zero at the bottom, half a decade of headroom above for labels
            ax.set_ylim(0, max(tops) * (3.0 if pos else 1.4))
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, fontsize=8, frameon=False)
        placed = place_labels(fig, ax, [(p["label"], p["x"], p["y"]) for p in points])
        if boxes is not None:
            boxes.extend(placed)
        return _svg(fig)
