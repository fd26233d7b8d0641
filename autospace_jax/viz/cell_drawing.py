"""The learned space as drawings: one row per layer, one panel per cell, each cell
drawn as its 6-node DAG (see :mod:`genome`), live edges dark, dead ones grey.

A 21 x 9 grid is ~190 cells, ~1500 edges and ~3000 labels. One matplotlib
Axes, FancyArrowPatch and Text per item took ~12 s on one CPU core, so the
whole grid is drawn on a single Axes whose data unit is one inch, and every
kind of primitive is batched into one collection: polylines (edges),
triangles (arrowheads), a scatter (nodes), and one PathCollection per
distinct label string (the glyphs are converted to a path once and stamped
at every position). Figures are built as :mod:`plots` builds them (no pyplot).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict

import numpy as np
from matplotlib.collections import LineCollection, PathCollection, PolyCollection
from matplotlib.path import Path
from matplotlib.text import TextPath
from matplotlib.transforms import Affine2D

from autospace_jax.space.genome import EDGES, OPS, Genome, is_skip, live_edges
from autospace_jax.viz import plots

_PANEL_W, _PANEL_H = 2.2, 1.2  # Inches per cell panel.
_HEADER = 0.35  # Inches above the grid for the figure title.
_DPI = 120  # 6.5 pt labels are ~11 px tall: legible when zoomed out a little.
# Beyond this many layers per file the grid is split (see draw_cells); it also
# keeps a PNG under ~4000 px tall.
MAX_ROWS_PER_FILE = 24

# Node centres in inches from a panel's lower-left corner, left to right. The
# inner nodes 2 and 3 sit on an arc above the 1 -> 4 axis.
_POS: dict[int, tuple[float, float]] = {
    0: (0.14, 0.30),
    1: (0.54, 0.30),
    2: (0.92, 0.68),
    3: (1.38, 0.68),
    4: (1.76, 0.30),
    5: (2.06, 0.30),
}
# Curvature of each evolvable edge, as matplotlib's arc3: the control point is
# the chord midpoint plus rad * (dy, -dx), so negative bends above a
# left-to-right edge. 1-3 loops over node 2; with 1-4 straight along the
# bottom, no two evolvable edges cross, and the IRB (1-4 only) reads as a line.
_RAD: dict[tuple[int, int], float] = {(1, 3): -1.0}
# Where along an edge its label sits (0 = tail, 1 = head): 2-4 is pulled
# towards node 2 so its label does not meet the 3-4 label.
_LABEL_AT: dict[tuple[int, int], float] = {(2, 4): 0.4}
_NODE_R = 6.5 / 72  # Node radius; edges stop at the rim.
_HEAD_L, _HEAD_W = 5.5 / 72, 2.0 / 72  # Arrowhead length and half-width.
_LABEL_PT, _NODE_PT, _TITLE_PT = 6.5, 7.0, 7.0
_LIVE, _DEAD, _IO = "#1f4e79", "#9a9a9a", "#444444"


def _bezier(i: int, j: int, t: np.ndarray) -> np.ndarray:
    """Points (len(t), 2) of edge i -> j in panel inches: a quadratic Bezier (arc3)."""
    p0, p2 = np.array(_POS[i]), np.array(_POS[j])
    d = p2 - p0
    ctrl = (p0 + p2) / 2 + _RAD.get((i, j), 0.0) * np.array([d[1], -d[0]])
    t = np.asarray(t, dtype=float)[:, None]
    return (1 - t) ** 2 * p0 + 2 * t * (1 - t) * ctrl + t**2 * p2


def _cut(points: np.ndarray, start: float, end: float) -> np.ndarray:
    """The part of a polyline between arc lengths ``start`` and ``total - end``."""
    s = np.concatenate(([0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))))
    lo, hi = start, s[-1] - end
    inner = points[(s > lo) & (s < hi)]
    ends = [
        np.array([[np.interp(v, s, points[:, 0]), np.interp(v, s, points[:, 1])]]) for v in (lo, hi)
    ]
    return np.concatenate([ends[0], inner, ends[1]])


class _Sheet:
    """Collects the primitives of all panels, then draws each kind in one go."""

    def __init__(self) -> None:
        self.lines: dict[tuple[str, bool], list[np.ndarray]] = defaultdict(list)
        self.heads: dict[str, list[np.ndarray]] = defaultdict(list)
        self.labels: dict[tuple[str, float, str, bool], list[tuple[float, float]]] = defaultdict(
            list
        )
        self.nodes: list[tuple[float, float, str]] = []
        self.frames: list[np.ndarray] = []

    def edge(self, origin: np.ndarray, i: int, j: int, label: str, color: str, dashed: bool):
        curve = _bezier(i, j, np.linspace(0.0, 1.0, 24)) + origin
        tip_to_tail = _cut(curve, _NODE_R, _NODE_R)
        # The line stops at the arrowhead's base so a dashed line cannot show through it.
        self.lines[(color, dashed)].append(_cut(tip_to_tail, 0.0, _HEAD_L))
        tip, base = tip_to_tail[-1], _cut(tip_to_tail, 0.0, _HEAD_L)[-1]
        along = (tip - base) / max(np.linalg.norm(tip - base), 1e-9)
        across = np.array([-along[1], along[0]]) * _HEAD_W
        self.heads[color].append(np.array([tip, base + across, base - across]))
        at = _bezier(i, j, [_LABEL_AT.get((i, j), 0.5)])[0] + origin
        if (i, j) in ((0, 1), (4, 5)):
            at = at + np.array([0.0, -0.15])  # IO labels sit under their short edge.
        self.label(label, at, _LABEL_PT, color, background=(i, j) not in ((0, 1), (4, 5)))

    def label(self, text: str, at, size: float, color: str, background: bool = False) -> None:
        self.labels[(text, size, color, background)].append((float(at[0]), float(at[1])))

    def draw(self, ax) -> None:
        for (color, dashed), lines in self.lines.items():
            ax.add_collection(
                LineCollection(
                    lines,
                    colors=color,
                    linewidths=0.8,
                    linestyles=(0, (3, 2)) if dashed else "solid",
                    zorder=1,
                ),
                autolim=False,
            )
        for color, heads in self.heads.items():
            ax.add_collection(
                PolyCollection(heads, facecolors=color, edgecolors="none", zorder=1),
                autolim=False,
            )
        if self.frames:
            ax.add_collection(
                LineCollection(self.frames, colors="#dddddd", linewidths=0.5, zorder=0),
                autolim=False,
            )
        if self.nodes:
            xs, ys, faces = zip(*self.nodes)
            ax.scatter(
                xs,
                ys,
                s=(2 * _NODE_R * 72) ** 2,
                c=faces,
                edgecolors="#333333",
                linewidths=0.6,
                zorder=2,
            )
        # Glyph paths are in points around the origin; stamp them at data offsets.
        points_to_px = Affine2D().scale(1 / 72) + ax.figure.dpi_scale_trans
        for (text, size, color, background), where in self.labels.items():
            glyphs = TextPath((0, 0), text, size=size)
            box = glyphs.get_extents()
            # Centre horizontally on the ink, vertically on the cap height, so
            # "c1" and "dw3" sit on the same line.
            shift = np.array([(box.x0 + box.x1) / 2, 0.36 * size])
            glyphs = Path(glyphs.vertices - shift, glyphs.codes)
            if background:
                pad = 1.0
                x0, x1 = box.x0 - shift[0] - pad, box.x1 - shift[0] + pad
                y0, y1 = -0.36 * size - pad, 0.44 * size + pad
                rect = Path([(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)], closed=True)
                ax.add_collection(
                    PathCollection(
                        [rect],
                        offsets=where,
                        offset_transform=ax.transData,
                        transform=points_to_px,
                        facecolors="white",
                        edgecolors="none",
                        alpha=0.85,
                        zorder=3,
                    ),
                    autolim=False,
                )
            ax.add_collection(
                PathCollection(
                    [glyphs],
                    offsets=where,
                    offset_transform=ax.transData,
                    transform=points_to_px,
                    facecolors=color,
                    edgecolors="none",
                    zorder=4,
                ),
                autolim=False,
            )


def _add_cell(sheet: _Sheet, ax, origin: np.ndarray, layer: int, genome: Genome, alpha: float):
    live = set(live_edges(genome))
    skip = is_skip(genome)
    # A skip cell runs neither IO conv: its output is the residual.
    io_color = _DEAD if skip else _IO
    io_in = "id" if genome.expansion == 1 else f"1x1 r={genome.expansion}"
    sheet.edge(origin, 0, 1, io_in, io_color, skip)
    sheet.edge(origin, 4, 5, "1x1", io_color, skip)
    used = set() if skip else {1, 4}
    for (i, j), op in zip(EDGES, genome.ops):
        if op == "zero":
            continue
        if (i, j) in live:
            used.update((i, j))
        color = _LIVE if (i, j) in live else _DEAD
        sheet.edge(origin, i, j, OPS[op].label, color, (i, j) not in live)
    for n, (x, y) in _POS.items():
        face = "#cfe2f3" if n in (0, 5) else ("#fff2cc" if n in used else "#eeeeee")
        sheet.nodes.append((origin[0] + x, origin[1] + y, face))
        sheet.label(str(n), origin + np.array([x, y]), _NODE_PT, "black")
    if skip:
        # Edge 1-4 is always zero in a skip cell, so its place is free for the word.
        sheet.label("skip", origin + np.array([1.15, _POS[1][1]]), 11.0, "#c00000")
    ax.text(
        origin[0] + _PANEL_W / 2,
        origin[1] + _PANEL_H - 0.1,
        f"L{layer} a={alpha:.2f} r={genome.expansion} {genome.aggregation}",
        fontsize=_TITLE_PT,
        ha="center",
        va="center",
    )
    w, h = _PANEL_W, _PANEL_H
    sheet.frames.append(
        origin
        + np.array(
            [[0.02, 0.02], [w - 0.02, 0.02], [w - 0.02, h - 0.02], [0.02, h - 0.02], [0.02, 0.02]]
        )
    )


def _part_paths(path: str, parts: int) -> list[str]:
    if parts == 1:
        return [path]
    root, ext = os.path.splitext(path)
    return [f"{root}_part{p + 1}{ext or '.png'}" for p in range(parts)]


def draw_cells(layers: list[list[tuple[Genome, float]]], path: str) -> None:
    """Draws the learned search space: one row per layer, one panel per top-K cell.

    Each panel is the cell's DAG left to right: node 0 (input) -> 1x1 expansion
    (``id`` for r = 1) -> inner nodes 1..4 -> 1x1 projection -> node 5
    (output). Every non-zero evolvable edge is an arrow labelled with its short
    op name (``Op.label`` of :data:`genome.OPS`: id, c1, c3, dw3, dw5, dw7); live edges are solid
    blue, dead ones (non-zero but off every 1 -> 4 path) dashed grey, and inner
    nodes no live edge touches are grey. A skip cell says "skip" and dashes its
    IO edges. Panel titles are ``L{l} a={alpha:.2f} r={r} {aggregation}``.

    Each panel is 2.2 x 1.2 inches at 120 dpi, so 21 layers x 9 cells is one
    ~2400 x 3100 px PNG, drawn in under 2 s on one CPU core. Grids with more than
    :data:`MAX_ROWS_PER_FILE` layers are split into near-equal parts written to
    ``<stem>_part1.png``, ``<stem>_part2.png``, ... instead of ``path``; rows
    keep their true layer index in the titles.

    Args:
      layers: ``layers[l]`` is layer l's cells as ``(genome, alpha)`` pairs,
        best first. Layers may hold different numbers of cells (missing panels
        are blank); an empty list writes a placeholder figure.
      path: output PNG path; parent directories are created.

    Returns:
      None.
    """
    num_layers = len(layers)
    parts = max(1, math.ceil(num_layers / MAX_ROWS_PER_FILE))
    per_part = math.ceil(num_layers / parts) if num_layers else 0
    for p, out in enumerate(_part_paths(path, parts)):
        first = p * per_part
        chunk = layers[first : first + per_part]
        rows = max(1, len(chunk))
        cols = max(1, max((len(cells) for cells in chunk), default=0))
        width, height = _PANEL_W * cols, _PANEL_H * rows + _HEADER
        fig = plots.new_figure(width, height, dpi=_DPI)
        # One Axes over the whole figure, one data unit per inch: equal aspect,
        # and sizes in points convert exactly.
        ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
        ax.set_xlim(0.0, width)
        ax.set_ylim(0.0, height)
        ax.set_axis_off()
        suffix = f" (part {p + 1}/{parts})" if parts > 1 else ""
        ax.text(
            width / 2,
            height - _HEADER / 2,
            f"learned search space: top cells per layer{suffix}",
            fontsize=10,
            ha="center",
            va="center",
        )
        sheet = _Sheet()
        for r, cells in enumerate(chunk):
            for c, (genome, alpha) in enumerate(cells):
                origin = np.array([c * _PANEL_W, height - _HEADER - (r + 1) * _PANEL_H])
                _add_cell(sheet, ax, origin, first + r, genome, float(alpha))
        if not chunk:
            ax.text(width / 2, (height - _HEADER) / 2, "no layers", ha="center", va="center")
        sheet.draw(ax)
        plots.save(fig, out)
