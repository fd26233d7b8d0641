"""The population side of the differentiable evolution, without JAX (paper §3.2.1; DESIGN §4).

Everything here is a pure function of genomes, fitness scores and a seeded
``random.Random``, so the whole evolutionary logic is unit-tested without a
network. :mod:`autospace_jax.evolution.stage` runs the supernet that produces the
fitness scores and calls these functions between generations.

How this module reads the paper where it is not explicit:

* **Novelty by function.** Two genomes that compute the same function (dead
  edges, an aggregation no node applies, the skip cell's expansion) have the
  same :func:`genome.canonical` form. A layer's population never holds two
  individuals of one function, initial population included, and distances to
  the reference (Eq. 2) are measured between canonical forms: a dead edge is
  not part of the DAG that computes.
* **Mutation** (:func:`breed`): one edge op, r or the aggregation changes. A
  change that leaves the parent's function as it was (a *neutral* mutation:
  an op on a dead edge, say) is kept and mutated again, up to
  :data:`MAX_NEUTRAL` times, as Cartesian GP's "single active mutation"
  (Goldman & Punch, 2013) does: a single op can never grow a path 1 -> j -> 4
  out of an IRB (each of its two edges alone is dead), so without neutral
  steps the DAG could not grow at all. A child that is invalid in the layer,
  computes a function some living individual computes, costs MAdds_max or
  more, (first half of the generations) lies tau or further from the
  reference, or (with a latency bound) is not faster than the bound is
  rejected and the parent tried again; rejections are counted by reason
  (:data:`REASONS`).
* **Breeding** ("the winner cells with the largest K fitness scores are allowed
  to generate off-springs"): the parents are the K tournament winners of the
  generation, ranked by their fitness after the generation (Eq. 5); the
  ``offspring`` best of them produce one child each (``offspring = K``: every
  winner breeds).
* **The final space** ("after the network converges, the top K cells with the
  largest fitness scores"): only individuals trained for at least one whole
  generation (n' >= f) are candidates (:func:`final_candidates`); the
  candidates are trained together in final rounds until the top-K of every
  layer stops changing (:func:`top_k`, :func:`converged`), and that top-K is
  the space.
"""

from __future__ import annotations

import collections
import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import Any

from autospace_jax.runtime import errors
from autospace_jax.space import genome as genome_lib
from autospace_jax.space import madds

MAX_TRIES = 2000  # Mutation attempts per child before the parent gives up.
MAX_NEUTRAL = 4  # Neutral mutations walked through within one attempt.
# Why a mutation was not accepted as a child; "neutral" ones were walked on.
REASONS = ("neutral", "duplicate", "invalid", "madds", "tau", "latency")


@dataclasses.dataclass
class Individual:
    """One member of a layer's population."""

    genome: genome_lib.Genome
    alpha: float  # Fitness logit (Eq. 3-5).
    n_prime: int = 0  # n' of Eq. 4: supernet iterations it has been trained in, over its life.
    birth: int = 0  # Generation it was born in (its age is t - birth).

    @property
    def function(self) -> genome_lib.Genome:
        """Its canonical genome: equal for individuals computing the same function."""
        return genome_lib.canonical(self.genome)

    def to_json(self) -> dict[str, Any]:
        return {
            "genome": self.genome.to_json(),
            "alpha": self.alpha,
            "n_prime": self.n_prime,
            "birth": self.birth,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Individual:
        return cls(genome_lib.from_json(obj["genome"]), obj["alpha"], obj["n_prime"], obj["birth"])


@dataclasses.dataclass(frozen=True)
class LatencyBound:
    """Children must run faster than ``factor`` x the reference cell of their layer.

    ``timer(genome, (size, c_in, c_out, stride))`` gives a cell's milliseconds
    (:class:`latency.CellTimer`: timed once per function and shape, then remembered),
    so the bound is read from the same remembered times as the children.
    """

    timer: Callable[[genome_lib.Genome, tuple[int, int, int, int]], float]
    factor: float
    reference: genome_lib.Genome


@dataclasses.dataclass(frozen=True)
class Constraints:
    """What a genome must satisfy to join one layer's population."""

    stride: int
    c_in: int
    c_out: int
    size: int
    max_madds: float
    palette: str
    latency: LatencyBound | None = None  # evolution.max_latency_factor > 0.

    def cost(self, g: genome_lib.Genome) -> madds.Cost:
        return madds.cell_cost(g, self.size, self.c_in, self.c_out, self.stride)

    def madds(self, g: genome_lib.Genome) -> int:
        return self.cost(g).madds

    def latency_ms(self, g: genome_lib.Genome) -> float:
        return self.latency.timer(g, (self.size, self.c_in, self.c_out, self.stride))

    @property
    def max_latency_ms(self) -> float:
        return self.latency.factor * self.latency_ms(self.latency.reference)

    def under_madds_max(self, g: genome_lib.Genome) -> bool:
        """Eq. 1's constraint on every cell of the space: MAdds(d_i) < MAdds_max."""
        return self.madds(g) < self.max_madds

    def ok(self, g: genome_lib.Genome) -> bool:
        """Valid in the layer (palette, no skip cell without a residual), under MAdds_max and
        the latency bound."""
        return self.reject(g, set(), None, 1.0) is None

    def reject(
        self,
        g: genome_lib.Genome,
        living: set[genome_lib.Genome],
        reference: genome_lib.Genome | None,
        tau: float,
    ) -> str | None:
        """Why ``g`` may not join (one of :data:`REASONS`), or None.

        Args:
          g: the candidate.
          living: canonical genomes of the layer's living individuals.
          reference: the reference DAG while Eq. 2's constraint applies, else None.
          tau: the Hamming threshold (Eq. 2); ``g`` must lie strictly closer.
        """
        try:
            genome_lib.validate(g, self.palette)
            genome_lib.check_for_layer(g, self.stride, self.c_in, self.c_out)
        except genome_lib.GenomeError:
            return "invalid"
        function = genome_lib.canonical(g)
        if function in living:
            return "duplicate"
        if not self.under_madds_max(g):
            return "madds"
        if reference is not None and distance(function, reference) >= tau:
            return "tau"
        # Last: timing a cell compiles it, every other test is arithmetic.
        if self.latency is not None and self.latency_ms(g) >= self.max_latency_ms:
            return "latency"
        return None


def distance(g: genome_lib.Genome, reference: genome_lib.Genome) -> float:
    """Eq. 2 between the functions of ``g`` and the reference (their canonical forms)."""
    return genome_lib.hamming(genome_lib.canonical(g), genome_lib.canonical(reference))


def momentum_update(alpha_star: float, alpha_pop: float, epsilon: float) -> float:
    """Eq. 5: alpha^(t) = epsilon * alpha* + (1 - epsilon) * alpha^(t-1)."""
    return epsilon * alpha_star + (1.0 - epsilon) * alpha_pop


def tournament(
    population: Sequence[Individual], k: int, size: int, rng: random.Random
) -> list[int]:
    """K times: draw ``size`` not-yet-picked individuals at random, keep the fittest.

    Returns:
      The K winners' indices into ``population``, in the order they won.
    """
    left, picked = list(range(len(population))), []
    for _ in range(k):
        draw = rng.sample(left, min(size, len(left)))
        best = max(draw, key=lambda i: (population[i].alpha, population[i].genome.id))
        picked.append(best)
        left.remove(best)
    return picked


def least_trained(population: Sequence[Individual], k: int, rng: random.Random) -> list[int]:
    """The K individuals trained least so far (n'), ties in a random order: a warm-up
    round's cells, so that the warm-up trains the whole population alike and no cell
    enters the generations untrained beside warmed-up ones (alpha, still as initialised,
    would pick the same few every round)."""
    order = rng.sample(range(len(population)), len(population))
    return sorted(order, key=lambda i: population[i].n_prime)[:k]


def breed(
    parent: genome_lib.Genome,
    constraints: Constraints,
    living: set[genome_lib.Genome],
    rng: random.Random,
    reference: genome_lib.Genome | None,
    tau: float,
) -> tuple[genome_lib.Genome | None, collections.Counter]:
    """A child of ``parent`` that may join the layer (see the module docstring).

    Args:
      parent: the parent genome.
      constraints: the layer's.
      living: canonical genomes of the layer's living individuals (parent included).
      rng: the generation's mutation generator.
      reference: the reference DAG while Eq. 2's constraint applies, else None.
      tau: the Hamming threshold.

    Returns:
      (child or None after :data:`MAX_TRIES` attempts, mutations rejected by reason).
    """
    rejected: collections.Counter = collections.Counter({reason: 0 for reason in REASONS})
    function = genome_lib.canonical(parent)
    for _ in range(MAX_TRIES):
        child = parent
        for _ in range(MAX_NEUTRAL + 1):
            child = genome_lib.mutate(child, rng, constraints.palette)
            if genome_lib.canonical(child) != function:
                break
            rejected["neutral"] += 1
        else:
            continue
        reason = constraints.reject(child, living, reference, tau)
        if reason is None:
            return child, rejected
        rejected[reason] += 1
    return None, rejected


def initial_population(
    constraints: Constraints,
    size: int,
    rng: random.Random,
    reference: genome_lib.Genome | None,
    tau: float,
) -> list[genome_lib.Genome]:
    """``size`` genomes of distinct functions: the reference (when it fits the layer) and
    1-3 mutations of it within tau, or uniform random genomes when ``reference`` is None.

    Raises:
      ValueError: naming the config fields to change when ``size`` distinct functions
        cannot be found.
    """
    genomes: list[genome_lib.Genome] = []
    functions: set[genome_lib.Genome] = set()

    def admit(g: genome_lib.Genome) -> None:
        genomes.append(g)
        functions.add(genome_lib.canonical(g))

    if reference is not None and constraints.ok(reference):
        admit(reference)
    for _ in range(MAX_TRIES * 10):
        if len(genomes) == size:
            return genomes
        if reference is not None:
            g = reference
            for _ in range(rng.randint(1, 3)):
                g = genome_lib.mutate(g, rng, constraints.palette)
        else:
            g = genome_lib.random_genome(rng, constraints.palette)
        if constraints.reject(g, functions, reference, tau) is None:
            admit(g)
    bound = ""
    if constraints.latency is not None:
        bound = (f" and {constraints.max_latency_ms:.3f} ms "
                 "(config.evolution.max_latency_factor)")  # fmt: skip
    raise errors.ConfigError(
        f"could not find {size} genomes of distinct functions (config.evolution.population_size) "
        f"within tau={tau} (config.evolution.tau) under MAdds_max={constraints.max_madds:.0f} "
        f"(config.evolution.max_madds_factor){bound}; raise tau or the factor, or lower the "
        "population"
    )


def parents(population: Sequence[Individual], winners: Sequence[int], offspring: int) -> list[int]:
    """The winners that breed: the ``offspring`` fittest of them (fitness after Eq. 5)."""
    ranked = sorted(winners, key=lambda i: (-population[i].alpha, population[i].genome.id))
    return ranked[:offspring]


def cull(population: list[Individual], size: int, removal: str) -> list[Individual]:
    """Removes individuals until ``size`` are left: the oldest (aging) or the least fit.

    Returns:
      The removed individuals.
    """
    removed = []
    while len(population) > size:
        if removal == "oldest":
            victim = min(population, key=lambda ind: (ind.birth, ind.alpha, ind.genome.id))
        else:
            victim = min(population, key=lambda ind: (ind.alpha, ind.birth, ind.genome.id))
        population.remove(victim)
        removed.append(victim)
    return removed


def _by_fitness(population: Sequence[Individual], indices) -> list[int]:
    return sorted(indices, key=lambda i: (-population[i].alpha, population[i].genome.id))


def final_candidates(population: Sequence[Individual], k: int, min_trained: int) -> list[int]:
    """The individuals of one layer that the final rounds train together.

    Eligible: trained for at least one whole generation (``n' >= min_trained``).
    The ``2 K`` fittest eligible individuals; when fewer than K are eligible, the
    fittest others fill up to K (the final rounds then train them before any is
    chosen, so every cell of the space has ``n' >= min_trained``).

    Returns:
      Indices into ``population``, fittest first.
    """
    everyone = range(len(population))
    eligible = _by_fitness(
        population, [i for i in everyone if population[i].n_prime >= min_trained]
    )
    others = _by_fitness(population, [i for i in everyone if i not in eligible])
    return (eligible[: 2 * k] + others)[: max(k, min(2 * k, len(eligible)))]


def top_k(population: Sequence[Individual], indices: Sequence[int], k: int) -> list[int]:
    """The K fittest of ``indices``, fittest first."""
    return _by_fitness(population, indices)[:k]


def converged(before: Sequence[Sequence[int]], after: Sequence[Sequence[int]]) -> bool:
    """Whether a final round left the top-K set of every layer as it was."""
    return all(set(a) == set(b) for a, b in zip(before, after, strict=True))
