"""Breeding (steps 5-6 of a generation, paper §3.2.1): children of the winners under
their layer's constraints, the population cut back to P, and the compiled programs of
cells that died released."""

from __future__ import annotations

import random

from absl import logging

from autospace_jax.evolution import population as pop_lib
from autospace_jax.evolution.population import Individual
from autospace_jax.space import genome as genome_lib
from autospace_jax.supernet import pieces, precompile


def reproduce(evo, picked: list[list[int]], rng: random.Random) -> None:
    """Steps 5-6 of a generation: the ``offspring`` fittest winners of each layer each
    breed one child (a function new to the layer, under its constraints), which inherits
    its parent's alpha and weights; then the population is cut back to P."""
    t, ec = evo.fitness_generation, evo.ec
    first_half = t < ec.generations / 2
    reference = evo.reference if (ec.use_reference and first_half) else None
    dead = []
    for l, winners in enumerate(picked):
        pop, cons = evo.populations[l], evo.constraints[l]
        for i in pop_lib.parents(pop, winners, ec.offspring):
            parent = pop[i]
            living = {ind.function for ind in pop}
            child, rejected = pop_lib.breed(parent.genome, cons, living, rng, reference, ec.tau)
            evo.rejected.update(rejected)
            if child is None:
                logging.warning(
                    "evolve: layer %d, no allowed child of %s after %d tries",
                    l,
                    parent.genome,
                    pop_lib.MAX_TRIES,
                )
                continue
            inherited = evo.bank.add(l, child, parent=parent.genome)
            pop.append(Individual(child, parent.alpha, 0, evo.generation + 1))
            evo.children.append(
                {
                    "generation": t,
                    "layer": l,
                    "parent": parent.genome.to_json(),
                    "child": child.to_json(),
                    "canonical_id": genome_lib.canonical(child).id,
                    "madds": cons.madds(child),
                    "max_madds": cons.max_madds,
                    **_latency_record(cons, child),
                    "hamming_to_reference": pop_lib.distance(child, evo.reference),
                    "first_half": first_half,
                    "inherited": inherited,
                    "rejected": dict(rejected),
                }
            )
        for victim in pop_lib.cull(pop, ec.population_size, ec.removal):
            evo.bank.remove(l, victim.genome)
            dead.append((l, victim.function))
    release(evo, dead)


def _latency_record(cons: pop_lib.Constraints, child: genome_lib.Genome) -> dict[str, float]:
    if cons.latency is None:
        return {}
    return {"latency_ms": cons.latency_ms(child), "max_latency_ms": cons.max_latency_ms}


def release(evo, dead: list[tuple[int, genome_lib.Genome]]) -> None:
    """Drops the compiled programs of cells no population holds any more: each holds
    host memory (about 15 MB per cell at 112 px on CPU), and over an evolution most
    cells die. One born again compiles again. Layers of one shape share programs."""

    def module(l: int, genome: genome_lib.Genome):
        return precompile.cell_job(evo, l, genome)[0]

    living = {module(l, ind.function) for l, pop in enumerate(evo.populations) for ind in pop}
    pieces.release({module(l, g) for l, g in dead} - living)
    evo.precompiler.forget(dead)
