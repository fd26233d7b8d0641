"""Search spaces: per layer a list of candidate genomes (DESIGN §6).

A space is a :class:`~autospace_jax.supernet.SupernetSpec` (skeleton + K
candidates per layer). Two kinds:

* ``learned``: the top-K cells per layer that ``evolve`` wrote to ``space.json``;
* ``manual_irb``: the paper's manually-designed baseline, IRB with kernel
  {3, 5, 7} x expansion {3, 6} (extended palette), plus the skip cell in the
  layers that have a residual (it is invalid elsewhere).
"""

from __future__ import annotations

import os
from typing import Any

from autospace_jax import arch as arch_lib
from autospace_jax import files
from autospace_jax import genome as genome_lib
from autospace_jax.supernet import SupernetSpec

NAMES = ("manual_irb", "learned")


def manual_irb(skeleton: arch_lib.Skeleton) -> SupernetSpec:
    candidates, c_in = [], skeleton.stem
    for c_out, stride in skeleton.layers:
        layer = list(genome_lib.manual_irb_genomes())
        if not genome_lib.has_residual(stride, c_in, c_out):
            layer.remove(genome_lib.SKIP)
        candidates.append(tuple(layer))
        c_in = c_out
    return SupernetSpec(skeleton, tuple(candidates))


def load_space(path: str) -> SupernetSpec:
    """Reads an evolve ``space.json``; errors name the file and the problem."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"space file {path!r} does not exist (run --mode=evolve first, or use "
            "--config.search.space=manual_irb)"
        )
    try:
        obj = files.read_json(path)
    except ValueError as e:
        raise genome_lib.GenomeError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict) or not {"skeleton", "layers"} <= set(obj):
        raise genome_lib.GenomeError(f"{path}: expected an object with 'skeleton' and 'layers'")
    skeleton = arch_lib.arch_from_json(
        {"skeleton": obj["skeleton"], "genomes": [_first(layer, path) for layer in obj["layers"]]},
        path,
    ).skeleton
    candidates = []
    for l, layer in enumerate(obj["layers"]):
        genomes = [
            genome_lib.from_json(
                c.get("genome") if isinstance(c, dict) else c, f"{path}: layers[{l}][{k}]"
            )
            for k, c in enumerate(layer)
        ]
        candidates.append(tuple(genomes))
    try:
        return SupernetSpec(skeleton, tuple(candidates))
    except genome_lib.GenomeError as e:
        raise genome_lib.GenomeError(f"{path}: {e}") from None


def _first(layer: Any, path: str) -> Any:
    if not isinstance(layer, list) or not layer or not isinstance(layer[0], dict):
        raise genome_lib.GenomeError(f"{path}: every entry of 'layers' must be a non-empty list")
    return layer[0].get("genome")


def resolve(name: str, workdir: str, skeleton: arch_lib.Skeleton) -> tuple[SupernetSpec, str]:
    """``manual_irb`` | ``learned`` (``<workdir>/evolve/space.json``) | a space.json path.

    Returns:
      (space, where it came from).
    """
    if name == "manual_irb":
        return manual_irb(skeleton), name
    path = os.path.join(workdir, "evolve", "space.json") if name == "learned" else name
    space = load_space(path)
    if space.skeleton.num_classes != skeleton.num_classes:
        raise ValueError(
            f"{path}: skeleton.num_classes={space.skeleton.num_classes} but the dataset has "
            f"{skeleton.num_classes} classes"
        )
    return space, path
