"""Fitness-history plot, cell drawings and the space table of the evolve stage."""

import random

import numpy as np
import pytest
from PIL import Image

from autospace_jax.space import genome as g
from autospace_jax.viz import cell_drawing, plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Edge 1-2 is non-zero but node 2 has no way on to node 4: a dead edge.
DEAD_12 = g.Genome(ops=("conv1x1", "zero", "dwconv3x3", "zero", "zero", "zero"))
# Only a dead edge: a skip cell that still has something to draw dashed.
ONLY_DEAD = g.Genome(ops=("conv1x1",) + ("zero",) * 5, expansion=1)


def _genomes() -> list[g.Genome]:
    return [g.irb(3, 6), g.SKIP, g.random_genome(random.Random(0)), DEAD_12]


def _layers(num_layers: int) -> list[list[tuple[g.Genome, float]]]:
    rng = random.Random(1)
    return [[(x, rng.uniform(-2, 2)) for x in _genomes()] for _ in range(num_layers)]


def _read_png(path) -> np.ndarray:
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.width > 0 and im.height > 0
        return np.asarray(im.convert("RGB"))


def _count_color(image: np.ndarray, hex_color: str) -> int:
    rgb = [int(hex_color[i : i + 2], 16) for i in (1, 3, 5)]
    return int(np.all(image == rgb, axis=-1).sum())


def test_dead_edge_fixture_is_dead():
    assert g.EDGES[0] == (1, 2) and DEAD_12.op(1, 2) != "zero"
    assert g.live_edges(DEAD_12) == ((1, 4),)
    assert g.is_skip(ONLY_DEAD) and not g.live_edges(ONLY_DEAD)


# ----------------------------------------------------------------------------
# draw_cells
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("num_layers", [1, 5])
def test_draw_cells_writes_png_sized_to_grid(tmp_path, num_layers):
    path = tmp_path / "sub" / "cells.png"  # Parent created by draw_cells.
    cell_drawing.draw_cells(_layers(num_layers), str(path))
    image = _read_png(path)
    height, width, _ = image.shape
    # One column per cell, one row per layer, each panel a fixed size.
    assert width == pytest.approx(4 * cell_drawing._PANEL_W * cell_drawing._DPI, abs=2)
    expected_h = (num_layers * cell_drawing._PANEL_H + cell_drawing._HEADER) * cell_drawing._DPI
    assert height == pytest.approx(expected_h, abs=2)
    assert (image < 250).any(axis=-1).mean() > 0.01  # Not blank.
    assert _count_color(image, cell_drawing._LIVE) > 0


def test_draw_cells_colors_live_and_dead_edges(tmp_path):
    def draw(genome):
        path = tmp_path / f"{genome.id}.png"
        cell_drawing.draw_cells([[(genome, 0.0)]], str(path))
        return _read_png(path)

    skip, irb, only_dead = draw(g.SKIP), draw(g.irb(5, 3)), draw(ONLY_DEAD)
    # Live edges are drawn in the live colour; a skip cell has none.
    assert _count_color(skip, cell_drawing._LIVE) == 0
    assert _count_color(irb, cell_drawing._LIVE) > 50
    # The dead edge is drawn (dashed, grey) though it never computes.
    assert _count_color(only_dead, cell_drawing._LIVE) == 0
    assert _count_color(only_dead, cell_drawing._DEAD) > _count_color(skip, cell_drawing._DEAD) + 10


def test_draw_cells_ragged_and_empty(tmp_path):
    ragged = [[(g.irb(), 1.0)], [(g.SKIP, 0.5), (DEAD_12, 0.25), (g.irb(7, 1), 0.0)]]
    cell_drawing.draw_cells(ragged, str(tmp_path / "ragged.png"))
    assert _read_png(tmp_path / "ragged.png").shape[1] == pytest.approx(
        3 * cell_drawing._PANEL_W * cell_drawing._DPI, abs=2
    )
    cell_drawing.draw_cells([], str(tmp_path / "empty.png"))
    assert (_read_png(tmp_path / "empty.png") < 250).any()


def test_draw_cells_splits_tall_grids(tmp_path, monkeypatch):
    monkeypatch.setattr(cell_drawing, "MAX_ROWS_PER_FILE", 2)
    cell_drawing.draw_cells(_layers(5), str(tmp_path / "cells.png"))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["cells_part1.png", "cells_part2.png", "cells_part3.png"]
    heights = [_read_png(tmp_path / n).shape[0] for n in names]
    assert heights[0] == heights[1] > heights[2]  # 5 layers -> 2 + 2 + 1 rows.


def test_draw_cells_paper_size_grid(tmp_path):
    # 21 layers x 9 cells, the paper's setting: one PNG, bounded in pixels.
    rng = random.Random(2)
    layers = [[(g.random_genome(rng), rng.gauss(0, 1)) for _ in range(9)] for _ in range(21)]
    cell_drawing.draw_cells(layers, str(tmp_path / "cells.png"))
    height, width, _ = _read_png(tmp_path / "cells.png").shape
    assert width <= 9 * 2.2 * cell_drawing._DPI + 2 and height < 4000


# ----------------------------------------------------------------------------
# plot_fitness_history
# ----------------------------------------------------------------------------


def _history(num_layers: int, num_gens: int = 12) -> list[list[list[dict]]]:
    """Populations that change: every generation one individual dies, one is born."""
    rng = random.Random(3)
    pops = [[{"id": f"L{l}-{k}", "alpha": 0.0} for k in range(4)] for l in range(num_layers)]
    history, born = [], 0
    for _ in range(num_gens):
        for pop in pops:
            for ind in pop:
                ind["alpha"] += rng.gauss(0.1, 0.2)
            pop.pop(rng.randrange(len(pop)))
            pop.append({"id": f"new{born}", "alpha": rng.gauss(0, 0.2)})
            born += 1
        history.append([[dict(ind) for ind in pop] for pop in pops])
    return history


@pytest.mark.parametrize("num_layers", [1, 5, 21])
def test_plot_fitness_history_writes_png(tmp_path, num_layers):
    path = tmp_path / "a" / "b" / "alpha.png"
    plots.plot_fitness_history(_history(num_layers), str(path))
    image = _read_png(path)
    assert (image < 250).any(axis=-1).mean() > 0.01
    # The grid grows with the layer count: 1 -> 1x1, 5 -> 3x2, 21 -> 4x6 panels.
    rows = {1: 1, 5: 2, 21: 6}[num_layers]
    assert image.shape[0] == pytest.approx(100 * (1.4 + 1.5 * rows + 0.7 * (rows - 1)), abs=2)


def test_alpha_series_tracks_lives_and_max():
    history = [
        [[{"id": "a", "alpha": 1.0}, {"id": "b", "alpha": 0.5}]],
        [[{"id": "b", "alpha": 2.0}]],  # a removed
        [[{"id": "a", "alpha": -1.0}, {"id": "c", "alpha": float("nan")}]],  # a re-born
        [],  # the layer is missing this generation
    ]
    series, best = plots._alpha_series(history, 0)
    assert sorted(series) == ["a", "b"]  # c never had a finite alpha.
    np.testing.assert_array_equal(series["a"], [1.0, np.nan, -1.0, np.nan])
    np.testing.assert_array_equal(series["b"], [0.5, 2.0, np.nan, np.nan])
    np.testing.assert_array_equal(best, [1.0, 2.0, -1.0, np.nan])


def test_plot_fitness_history_one_generation_and_empty(tmp_path):
    plots.plot_fitness_history([[[{"id": "x", "alpha": 0.3}]]], str(tmp_path / "one.png"))
    plots.plot_fitness_history([], str(tmp_path / "none.png"))
    for name in ("one.png", "none.png"):
        assert (_read_png(tmp_path / name) < 250).any()


def test_plot_fitness_history_names_bad_entry(tmp_path):
    history = [[[{"id": "x", "alpha": 0.3}], [{"id": "y"}]]]
    with pytest.raises(ValueError, match=r"history\[0\]\[1\]\[0\].*'alpha'"):
        plots.plot_fitness_history(history, str(tmp_path / "bad.png"))


# ----------------------------------------------------------------------------
# space_table
# ----------------------------------------------------------------------------


def test_space_table_lists_every_cell():
    layers = _layers(5)
    layers[3] = layers[3][:2]  # Layers may keep different numbers of cells.
    table = plots.space_table(layers)
    lines = table.splitlines()
    assert len(lines) == 1 + len(layers)
    for l, cells in enumerate(layers):
        assert lines[1 + l].startswith(f"L{l} ")
        for genome, alpha in cells:
            assert f"{genome} a={alpha:.3f}" in lines[1 + l]
    assert "r1/add[skip]" in table and "12:conv1x1 14:dwconv3x3" in table


def test_space_table_with_madds():
    layers = [[(g.irb(3, 6), 0.5), (g.SKIP, -0.25)], [(DEAD_12, 1.0)]]
    table = plots.space_table(layers, madds=[[12_345_678, 0], [2_500]])
    assert "r6/add[14:dwconv3x3] a=0.500 12.35M" in table
    assert "r1/add[skip] a=-0.250 0" in table
    assert f"{DEAD_12} a=1.000 2.50K" in table
    with pytest.raises(ValueError, match=r"madds\[1\] has 2 entries; layer 1 has 1 cells"):
        plots.space_table(layers, madds=[[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="madds has 1 layers"):
        plots.space_table(layers, madds=[[1, 2]])
