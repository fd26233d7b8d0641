"""Figures and a text table of the stages (the cell drawings are :mod:`cell_drawing`).

* :func:`plot_fitness_history`: every individual's fitness logit alpha over the
  generations it lived, one subplot per layer, with the per-generation maximum.
* :func:`plot_front`: a search's front of targets.
* :func:`space_table`: the learned space as plain text for the end of the log.

Figures are built as bare :class:`matplotlib.figure.Figure` objects rendered
by the Agg canvas, never through pyplot: this works without a display, leaves
the process-wide backend alone (importing this module from a notebook does not
switch it to Agg or close the user's figures), and no global figure registry
holds on to them, so calling these once per generation in a long run does not
leak memory. Each figure is still cleared after saving to free it promptly.
"""

from __future__ import annotations

import io
import math

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from autospace_jax.runtime import files
from autospace_jax.space.genome import Genome

# ----------------------------------------------------------------------------
# Fitness history.
# ----------------------------------------------------------------------------


def _grid_columns(n: int) -> int:
    """Columns of the per-layer grid: 21 layers (the paper's setting) -> 4 x 6."""
    if n <= 1:
        return 1
    if n <= 4:
        return 2
    if n <= 9:
        return 3
    return 4


def new_figure(width: float, height: float, dpi: float) -> Figure:
    """A pyplot-free figure with its own Agg canvas (see the module docstring)."""
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str) -> None:
    """PNG through :mod:`files`, so ``path`` may be on gs:// and its parents are created."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=fig.dpi)
    fig.clear()  # Drop the artists now rather than whenever the GC runs.
    files.write_bytes(path, png.getvalue())


def plot_front(front: list[dict], unit: str, path: str) -> None:
    """A search's front: each target's chosen path, its cost against its supernet val
    top-1, the targets marked on the cost axis."""
    fig = new_figure(5.0, 3.4, 120)
    ax = fig.add_subplot(1, 1, 1)
    costs = [p["cost"] for p in front]
    ax.plot(costs, [p["val_accuracy"] for p in front], "o-", color="#1f77b4", label="chosen")
    for p in front:
        ax.axvline(p["target"], color="#999999", lw=0.8, ls=":")
    ax.set_xlabel(f"cost ({unit}); dotted: the targets")
    ax.set_ylabel("supernet val top-1")
    ax.set_title("search front")
    fig.tight_layout()
    save(fig, path)


def _alpha_series(
    history: list[list[dict]], layer: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-individual alpha over generations (NaN where absent) and the per-generation max."""
    num_gens = len(history)
    series: dict[str, np.ndarray] = {}
    best = np.full(num_gens, np.nan)
    for t, gen in enumerate(history):
        if layer >= len(gen):
            continue
        for i, ind in enumerate(gen[layer]):
            try:
                ident, alpha = str(ind["id"]), float(ind["alpha"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(
                    f"history[{t}][{layer}][{i}] = {ind!r}; expected a dict with keys "
                    f"'id' (str) and 'alpha' (float)"
                ) from e
            if not math.isfinite(alpha):
                continue  # A diverged logit would flatten the y axis of the whole panel.
            if ident not in series:
                series[ident] = np.full(num_gens, np.nan)
            series[ident][t] = alpha
            if not alpha <= best[t]:  # True also while best[t] is NaN.
                best[t] = alpha
    return series, best


def plot_fitness_history(history: list[list[dict]], path: str) -> None:
    """Plots every individual's fitness logit alpha over the generations it lived.

    One subplot per layer (shared generation axis). An individual is keyed by
    its ``id`` within its layer; each maximal run of consecutive generations it
    was alive is a thin line (a lone generation is a dot), so an individual
    removed and later re-born shows as two pieces. The thick black line is the
    per-generation maximum alpha of the layer. Non-finite alphas are skipped.

    Args:
      history: ``history[t][l]`` is the population of layer ``l`` after
        generation ``t``: a list of ``{"id": str, "alpha": float}`` dicts.
        Generations may have different numbers of layers (missing = empty).
      path: output PNG path; parent directories are created. An empty history
        still writes a placeholder figure, so a short run does not crash here.

    Returns:
      None. Raises ValueError naming the entry when an individual lacks
      ``id`` or ``alpha``.
    """
    num_gens = len(history)
    num_layers = max((len(gen) for gen in history), default=0)
    cols = _grid_columns(num_layers)
    rows = max(1, math.ceil(num_layers / cols))
    # Fixed margins in inches instead of constrained layout, whose solver is
    # most of the run time for 21 panels.
    # A lone panel is drawn wider so the legend fits on one line above it.
    axes_w, axes_h, wgap, hgap = (4.2 if cols == 1 else 2.6), 1.5, 0.55, 0.7
    left, right, bottom, top = 0.6, 0.2, 0.55, 0.85
    width = left + cols * axes_w + (cols - 1) * wgap + right
    height = bottom + rows * axes_h + (rows - 1) * hgap + top
    fig = new_figure(width, height, dpi=100)
    axes = fig.subplots(rows, cols, sharex=True, squeeze=False)
    fig.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=wgap / axes_w,
        hspace=hgap / axes_h,
    )
    fig.suptitle("fitness logits alpha per layer", y=1 - 0.12 / height, va="top")
    gens = np.arange(num_gens)
    colors = np.array(matplotlib.colormaps["tab10"].colors)
    for layer, ax in enumerate(axes.flat):
        if layer >= num_layers:
            if num_layers == 0 and layer == 0:
                ax.text(0.5, 0.5, "no generations yet", ha="center", va="center")
                ax.set_xticks([])
                ax.set_yticks([])
            else:
                ax.set_axis_off()
            continue
        series, best = _alpha_series(history, layer)
        segments, seg_colors, dots, dot_colors = [], [], [], []
        for k, values in enumerate(series.values()):
            alive = np.isfinite(values)
            t = np.flatnonzero(alive[:-1] & alive[1:])  # Both ends alive: a segment.
            segments.append(
                np.stack([np.stack([t, values[t]], 1), np.stack([t + 1, values[t + 1]], 1)], 1)
            )
            seg_colors.append(np.repeat(colors[k % len(colors)][None], len(t), 0))
            # Alive with no living neighbour: a one-generation life has no segment.
            prev = np.concatenate(([False], alive[:-1]))
            nxt = np.concatenate((alive[1:], [False]))
            t = np.flatnonzero(alive & ~prev & ~nxt)
            dots.append(np.stack([t, values[t]], 1))
            dot_colors.append(np.repeat(colors[k % len(colors)][None], len(t), 0))
        # One collection per panel instead of a Line2D per individual keeps
        # hundreds of individuals x 21 layers fast to draw.
        if series:
            segs, dots_xy = np.concatenate(segments), np.concatenate(dots)
            ax.add_collection(
                LineCollection(segs, colors=np.concatenate(seg_colors), linewidths=0.7, alpha=0.6)
            )
            ax.scatter(*dots_xy.T, s=6, c=np.concatenate(dot_colors), alpha=0.8, linewidths=0)
        # Markers keep a maximum visible where it has no neighbour to join.
        ax.plot(gens, best, color="black", linewidth=2.0, marker="o", markersize=2.5)
        plural = "" if len(series) == 1 else "s"
        ax.set_title(f"layer {layer} ({len(series)} individual{plural})", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(True, linewidth=0.3, alpha=0.5)
        ax.autoscale_view()
        if layer % cols == 0:
            ax.set_ylabel("alpha", fontsize=8)
        if layer + cols >= num_layers:  # Last panel of its column: it carries the x axis.
            ax.set_xlabel("generation", fontsize=8)
            ax.xaxis.set_tick_params(labelbottom=True)
    axes.flat[0].xaxis.set_major_locator(MaxNLocator(integer=True))  # Shared by all panels.
    if num_gens == 1:
        axes.flat[0].set_xlim(-0.5, 0.5)
        axes.flat[0].set_xticks([0])
    if num_layers:
        fig.legend(
            handles=[
                Line2D([], [], color="black", linewidth=2.0, marker="o", ms=2.5, label="max alpha"),
                Line2D([], [], color="grey", linewidth=0.7, label="one individual's life"),
                Line2D([], [], color="grey", marker=".", linestyle="", label="lived 1 generation"),
            ],
            loc="upper center",
            ncols=3,
            fontsize=7,
            frameon=False,
            bbox_to_anchor=(0.5, 1 - 0.38 / height),
        )
    save(fig, path)


# ----------------------------------------------------------------------------
# Text table.
# ----------------------------------------------------------------------------


def _fmt_madds(m: int) -> str:
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(m) >= scale:
            return f"{m / scale:.2f}{unit}"
    return str(int(m))


def space_table(
    layers: list[list[tuple[Genome, float]]], madds: list[list[int]] | None = None
) -> str:
    """The learned space as plain text, one line per layer (for the end of the log).

    Each cell reads ``str(genome) a=<alpha:.3f>``, plus `` <MAdds>`` (e.g.
    ``12.35M``) when ``madds`` is given; cells are separated by `` | `` and
    padded into aligned columns.

    Args:
      layers: ``layers[l]`` is layer l's cells as ``(genome, alpha)`` pairs.
      madds: optional ``madds[l][k]``, the MAdds of cell k of layer l; must have
        the same shape as ``layers``.

    Returns:
      The table, header line first, no trailing newline. Raises ValueError
      when ``madds`` does not match ``layers`` in shape.
    """
    if madds is not None:
        if len(madds) != len(layers):
            raise ValueError(
                f"madds has {len(madds)} layers; expected one list per layer ({len(layers)})"
            )
        for l, (cells, m) in enumerate(zip(layers, madds)):
            if len(m) != len(cells):
                raise ValueError(
                    f"madds[{l}] has {len(m)} entries; layer {l} has {len(cells)} cells"
                )
    rows: list[list[str]] = []
    for l, cells in enumerate(layers):
        row = []
        for k, (genome, alpha) in enumerate(cells):
            text = f"{genome} a={float(alpha):.3f}"
            if madds is not None:
                text += f" {_fmt_madds(madds[l][k])}"
            row.append(text)
        rows.append(row)
    num_cols = max((len(r) for r in rows), default=0)
    widths = [max((len(r[k]) for r in rows if k < len(r)), default=0) for k in range(num_cols)]
    fields = "genome a=alpha MAdds" if madds is not None else "genome a=alpha"
    lines = [f"layer  cells ({len(layers)} layers, up to {num_cols} cells each): {fields}"]
    for l, row in enumerate(rows):
        cells_text = " | ".join(text.ljust(widths[k]) for k, text in enumerate(row)).rstrip()
        lines.append(f"L{l:<5d}{cells_text or '(empty)'}")
    return "\n".join(lines)
