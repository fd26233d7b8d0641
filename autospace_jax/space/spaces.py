"""Search spaces: per layer a list of candidate genomes (DESIGN §6).

A space is a :class:`SupernetSpec` (skeleton + K
candidates per layer). Two kinds:

* ``learned``: the top-K cells per layer that ``evolve`` wrote to ``space.json``;
* ``manual_irb``: the paper's manually-designed baseline, IRB with kernel
  {3, 5, 7} x expansion {3, 6} (the default palette), plus the skip cell in the
  layers that have a residual (it is invalid elsewhere).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from absl import logging
from etils import epath

from autospace_jax.runtime import errors
from autospace_jax.space import arch as arch_lib
from autospace_jax.space import genome as genome_lib
from autospace_jax.space.arch import Arch, Skeleton


@dataclasses.dataclass(frozen=True)
class SupernetSpec:
    """The skeleton and the K candidate genomes of every layer."""

    skeleton: Skeleton
    candidates: tuple[tuple[genome_lib.Genome, ...], ...]

    def __post_init__(self):
        object.__setattr__(self, "candidates", tuple(tuple(c) for c in self.candidates))
        if len(self.candidates) != self.skeleton.num_layers:
            raise genome_lib.GenomeError(
                f"supernet has candidates for {len(self.candidates)} layers; the skeleton "
                f"has {self.skeleton.num_layers}"
            )
        for l, layer in enumerate(self.candidates):
            if not layer or len(set(layer)) != len(layer):
                raise genome_lib.GenomeError(f"layer {l}: needs >= 1 distinct candidate genomes")
        arch_lib.check_layers(self.skeleton, self.candidates)

    def arch(self, path: Sequence[int]) -> Arch:
        """The standalone network of one path (one candidate index per layer)."""
        return Arch(self.skeleton, tuple(layer[k] for layer, k in zip(self.candidates, path)))


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
    """Reads an evolve ``space.json`` (local or any etils.epath URL, e.g. gs://).

    Raises:
      MissingFileError: the file does not exist.
      GenomeError: one message naming the file, the field and what is accepted.
    """
    if not epath.Path(path).exists():
        raise errors.MissingFileError(
            f"space file {path!r} does not exist (run --mode=evolve first, or use "
            "--config.search.space=manual_irb)"
        )
    obj = arch_lib.read_json(path, "space")
    if not isinstance(obj, dict) or not {"skeleton", "layers"} <= set(obj):
        got = f"keys {sorted(obj)}" if isinstance(obj, dict) else type(obj).__name__
        raise genome_lib.GenomeError(
            f"{path}: expected an object with 'skeleton' and 'layers', got {got}"
        )
    skeleton = arch_lib.skeleton_from_json(obj["skeleton"], path)
    palette = _palette(obj.get("palette"), path)
    layers = obj["layers"]
    if not isinstance(layers, list):
        raise genome_lib.GenomeError(
            f"{path}: 'layers' is a {type(layers).__name__}; accepted: a list of candidate "
            "lists, one per layer of the skeleton"
        )
    if len(layers) != skeleton.num_layers:
        raise genome_lib.GenomeError(
            f"{path}: 'layers' has {len(layers)} entries for a skeleton of "
            f"{skeleton.num_layers} layers; accepted: one candidate list per layer"
        )
    candidates = tuple(_layer(layer, path, l, palette) for l, layer in enumerate(layers))
    try:
        return SupernetSpec(skeleton, candidates)
    except genome_lib.GenomeError as e:  # A genome that does not fit its layer.
        raise genome_lib.GenomeError(f"{path}: {e}") from None


def _palette(name: Any, path: str) -> str | None:
    """The optional ``palette`` evolve drew the genomes from (None: any op)."""
    if name is not None and (not isinstance(name, str) or name not in genome_lib.PALETTES):
        raise genome_lib.GenomeError(
            f"{path}: palette={name!r}; accepted: {sorted(genome_lib.PALETTES)} or no 'palette'"
        )
    return name


def _layer(layer: Any, path: str, l: int, palette: str | None) -> tuple[genome_lib.Genome, ...]:
    """``layers[l]``: ``[{"genome": ..., <figures>}, ...]``, >= 1 distinct candidates."""
    where = f"{path}: layers[{l}]"
    if not isinstance(layer, list) or not layer:
        got = "empty" if layer == [] else f"a {type(layer).__name__}"
        raise genome_lib.GenomeError(
            f"{where} is {got}; accepted: a non-empty list of {{'genome': ...}} candidates"
        )
    genomes = []
    for k, candidate in enumerate(layer):
        if not isinstance(candidate, dict) or "genome" not in candidate:
            got = (
                f"keys {sorted(candidate)}"
                if isinstance(candidate, dict)
                else type(candidate).__name__
            )
            raise genome_lib.GenomeError(
                f"{where}[{k}]: expected an object with a 'genome' key, got {got}"
            )
        genome = genome_lib.from_json(candidate["genome"], f"{where}[{k}].genome")
        try:
            genome_lib.validate(genome, palette)
        except genome_lib.GenomeError as e:
            raise genome_lib.GenomeError(
                f"{where}[{k}].genome: {e} (set by the file's 'palette' key)"
            ) from None
        if genome in genomes:
            raise genome_lib.GenomeError(
                f"{where}[{k}] repeats layers[{l}][{genomes.index(genome)}] ({genome}); the "
                "candidates of a layer must be distinct"
            )
        genomes.append(genome)
    return tuple(genomes)


def resolve(name: str, workdir: str, skeleton: arch_lib.Skeleton) -> tuple[SupernetSpec, str]:
    """``manual_irb`` | ``learned`` (``<workdir>/evolve/space.json``) | a space.json path.

    Returns:
      (space, where it came from).
    """
    if name == "manual_irb":
        return manual_irb(skeleton), name
    path = str(epath.Path(workdir) / "evolve" / "space.json") if name == "learned" else name
    space = load_space(path)
    if space.skeleton.num_classes != skeleton.num_classes:
        raise genome_lib.GenomeError(
            f"{path}: skeleton.num_classes={space.skeleton.num_classes} but the dataset has "
            f"{skeleton.num_classes} classes"
        )
    if space.skeleton != skeleton:  # The file wins: its genomes were evolved for its layers.
        logging.warning(
            "%s: its skeleton (%d layers) differs from config.model (%d layers); searching "
            "the file's skeleton",
            path, space.skeleton.num_layers, skeleton.num_layers,
        )  # fmt: skip
    return space, path
