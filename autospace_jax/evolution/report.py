"""What an evolution produced: the learned space, its diagnostics and its files.

``evolve/space.json`` (per layer the final top-K, fittest first), ``children.json``,
``history.json``, the plots, and the figures that show whether the evolution
learned (``evolve/summary.json``, the log's last table; DESIGN §4), among them
how far each child's weights moved in its first generation.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import logging

from autospace_jax.evolution import population as pop_lib
from autospace_jax.runtime import distributed, files, sharding
from autospace_jax.viz import cell_drawing, plots


def cell_vector(state, l: int, k: int) -> np.ndarray:
    """Cell k of layer l's parameters in a supernet state, one host vector (empty for
    the skip cell)."""
    params = state.variables["params"][f"layer_{l}"].get(f"cell_{k}", {})
    leaves = sharding.to_host(jax.tree.leaves(params))
    return np.concatenate([np.ravel(a) for a in leaves]) if leaves else np.zeros(0)


def record_first_update(evo, state, picked: list[list[int]], before: dict) -> None:
    """A child's first generation in a supernet: how far its weights moved,
    ||w_after - w_before|| / ||w_before|| (``first_update`` in children.json): a cell
    born late must still train before it is scored.

    Args:
      evo: the evolution, after the generation trained.
      state: the generation's supernet state, trained.
      picked: per layer, the population indices of the supernet's cells.
      before: (layer, population index) -> :func:`cell_vector` before training, for
        the children trained for the first time.
    """
    where = {(c["layer"], c["canonical_id"]): c for c in evo.children}
    for (l, i), w in before.items():
        if not w.size:
            continue
        after = cell_vector(state, l, picked[l].index(i))
        child = where.get((l, evo.populations[l][i].function.id))
        if child is not None:
            child["first_update"] = float(np.linalg.norm(after - w) / np.linalg.norm(w))


def space_json(evo) -> dict[str, Any]:
    """The learned space as ``space.json`` holds it (spaces.load_space reads it back)."""
    layers = []
    for cons, top in zip(evo.constraints, evo.learned_space()):
        layers.append(
            [
                {
                    "genome": i.genome.to_json(),
                    "id": i.genome.id,
                    "canonical_id": i.function.id,
                    "alpha": i.alpha,
                    "n_prime": i.n_prime,
                    "madds": cons.madds(i.genome),
                    "params": cons.cost(i.genome).params,
                }
                for i in top
            ]
        )
    return {
        "skeleton": evo.skeleton.to_json(),
        "palette": evo.config.genome.palette,
        "layers": layers,
        "config": evo.config.to_dict(),
    }


def diagnostics(evo) -> dict[str, Any]:
    """What shows whether the evolution learned (summary.json, the log's last table)."""
    space = evo.learned_space()
    tried = sum(evo.rejected.values()) + len(evo.children)
    rounds = len(evo.final["tops"]) - 1
    half = evo.ec.generations / 2
    updates = ([], [])  # first_update of the children born in the first and second half.
    for c in evo.children:
        if "first_update" in c:
            updates[c["generation"] >= half].append(c["first_update"])
    return {
        "distinct_functions": [len({i.function for i in top}) for top in space],
        "n_prime": [[i.n_prime for i in top] for top in space],
        "alpha_spread": [max(i.alpha for i in top) - min(i.alpha for i in top) for top in space],
        # Mutations whose child computed a function already there (the parent's, walked
        # on, or another living individual's), of all mutations tried.
        "duplicate_share": (evo.rejected["neutral"] + evo.rejected["duplicate"]) / max(tried, 1),
        "rejected": dict(evo.rejected),
        "first_update": [float(np.mean(u)) if u else None for u in updates],
        "final_rounds": rounds,
        "final_converged": rounds > 0 and pop_lib.converged(*evo.final["tops"][-2:]),
    }


def diagnostics_table(d: dict[str, Any]) -> str:
    stable = "top-K stable" if d["final_converged"] else "top-K not stable"
    reasons = ", ".join(f"{k} {v}" for k, v in d["rejected"].items())
    lines = [
        f"final rounds {d['final_rounds']} ({stable}); functional duplicates: "
        f"{100 * d['duplicate_share']:.0f}% of the mutations tried (rejected: {reasons})",
        "layer  distinct functions  n' of each cell  alpha spread",
    ]
    for l, (n, n_prime, spread) in enumerate(
        zip(d["distinct_functions"], d["n_prime"], d["alpha_spread"])
    ):
        lines.append(f"{l:5d}  {n:18d}  {str(n_prime):15s}  {spread:.4f}")
    return "\n".join(lines)


def _learned(evo) -> list[list[tuple]]:
    return [[(i.genome, i.alpha) for i in top] for top in evo.learned_space()]


def write(evo, stage_dir: str) -> dict[str, Any]:
    """Writes space.json, children.json, history.json and the plots.

    Returns:
      :func:`diagnostics`.
    """
    space = space_json(evo)
    distributed.check_same("evolve: the learned space", space)
    files.write_json(os.path.join(stage_dir, "space.json"), space)
    files.write_json(os.path.join(stage_dir, "children.json"), evo.children)
    populations = [[ind.to_json() for ind in pop] for pop in evo.populations]
    files.write_json(
        os.path.join(stage_dir, "history.json"),
        {"history": evo.history, "populations": populations, "final": evo.final},
    )
    plots.plot_fitness_history(evo.history, os.path.join(stage_dir, "plots", "alpha_history.png"))
    cell_drawing.draw_cells(_learned(evo), os.path.join(stage_dir, "plots", "learned_cells.png"))
    return diagnostics(evo)


def log(evo, d: dict[str, Any]) -> None:
    """The log's last table: the learned space, then :func:`diagnostics`."""
    madds = [[cons.madds(i.genome) for i in top]
             for cons, top in zip(evo.constraints, evo.learned_space())]  # fmt: skip
    logging.info(
        "evolve: learned space\n%s\n%s",
        plots.space_table(_learned(evo), madds),
        diagnostics_table(d),
    )
