"""Differentiable evolution of the search space (paper §3.2, Eq. 2, 5, Fig. 2; DESIGN §4).

``--mode=evolve``: per layer, a population of P individuals (genome, alpha, n',
birth generation). Each generation t = 0..T-1:

1. tournament selection of K cells per layer (tournament size S) among the
   individuals born before generation t-1 (a child of generation t can be
   picked from t+2 on: its cell compiles in the background during t+1, see
   ``evolution.background_compile``; cells are compiled per canonical genome,
   so a child computing what its parent computes needs no compile at all);
2. a supernet of the picked cells, alpha from the population, weights from the
   :class:`~autospace_jax.weight_bank.WeightBank`;
3. f iterations: a weight step on a training batch, then (after the warm-up)
   a fitness step on a validation batch with the Eq. 4 compensation
   ``n(d)/n'(d)``, where n is the supernet's iteration count so far and n' the
   cell's own, clipped at ``supernet.compensation_clip``;
4. Eq. 5 for each picked cell, and n' += f;
5. the ``offspring`` fittest picked cells of each layer produce one child each
   (mutation repeated until the child is valid in the layer, new to the
   population, cheaper than the layer's MAdds_max and, in the first half of
   the generations only, within Hamming distance tau of the reference);
   a child starts with its parent's alpha and inherits its weights edge by edge;
6. the population is cut back to P (the oldest, or the least fit, go).

At the end the top-K individuals per layer by alpha form ``evolve/space.json``.
Every random choice comes from a generator seeded by (seed, generation, purpose)
and the whole state is checkpointed after each generation, so a killed run
resumes exactly.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from autospace_jax import arch as arch_lib
from autospace_jax import (
    cells,
    checkpoint,
    config_checks,
    distributed,
    failures,
    files,
    input_pipeline,
    madds,
    pieces,
    plots,
    sharding,
    writers,
)
from autospace_jax import genome as genome_lib
from autospace_jax import supernet as sn
from autospace_jax.weight_bank import WeightBank

STAGE = "evolve"
MAX_TRIES = 2000


@dataclasses.dataclass
class Individual:
    genome: genome_lib.Genome
    alpha: float
    n_prime: int = 0  # Iterations trained over its life in the population.
    birth: int = 0  # Generation it was born in (its age is t - birth).

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
class Constraints:
    """What a genome must satisfy to join layer ``layer``'s population."""

    stride: int
    c_in: int
    c_out: int
    size: int
    max_madds: float
    palette: str

    def madds(self, g: genome_lib.Genome) -> int:
        return madds.cell_cost(g, self.size, self.c_in, self.c_out, self.stride).madds

    def ok(self, g: genome_lib.Genome) -> bool:
        try:
            genome_lib.validate(g, self.palette)
            genome_lib.check_for_layer(g, self.stride, self.c_in, self.c_out)
        except genome_lib.GenomeError:
            return False
        return self.madds(g) < self.max_madds


def momentum_update(alpha_star: float, alpha_pop: float, epsilon: float) -> float:
    """Eq. 5: alpha^(t) = epsilon * alpha* + (1 - epsilon) * alpha^(t-1)."""
    return epsilon * alpha_star + (1.0 - epsilon) * alpha_pop


def tournament(population: list[Individual], k: int, size: int, rng: random.Random) -> list[int]:
    """K times: draw ``size`` not-yet-picked individuals at random, keep the fittest."""
    left, picked = list(range(len(population))), []
    for _ in range(k):
        draw = rng.sample(left, min(size, len(left)))
        best = max(draw, key=lambda i: (population[i].alpha, population[i].genome.id))
        picked.append(best)
        left.remove(best)
    return picked


def mutate_within(
    parent: genome_lib.Genome,
    constraints: Constraints,
    taken: set[genome_lib.Genome],
    rng: random.Random,
    reference: genome_lib.Genome | None,
    tau: float,
) -> genome_lib.Genome | None:
    """Mutations of ``parent`` until one is allowed (None after MAX_TRIES)."""
    for _ in range(MAX_TRIES):
        child = genome_lib.mutate(parent, rng, constraints.palette)
        if child in taken or not constraints.ok(child):
            continue
        if reference is not None and genome_lib.hamming(child, reference) >= tau:
            continue
        return child
    return None


def initial_population(
    constraints: Constraints,
    size: int,
    rng: random.Random,
    reference: genome_lib.Genome | None,
    tau: float,
) -> list[genome_lib.Genome]:
    """Mutations of the reference within tau (it included), or uniform random genomes."""
    genomes: list[genome_lib.Genome] = []
    if reference is not None and constraints.ok(reference):
        genomes.append(reference)
    for _ in range(MAX_TRIES):
        if len(genomes) == size:
            return genomes
        if reference is not None:
            g = reference
            for _ in range(rng.randint(1, 3)):
                g = genome_lib.mutate(g, rng, constraints.palette)
            if genome_lib.hamming(g, reference) >= tau:
                continue
        else:
            g = genome_lib.random_genome(rng, constraints.palette)
        if g not in genomes and constraints.ok(g):
            genomes.append(g)
    raise ValueError(
        f"could not find {size} distinct genomes (config.evolution.population_size) within "
        f"tau={tau} (config.evolution.tau) under MAdds_max={constraints.max_madds:.0f} "
        "(config.evolution.max_madds_factor); raise tau or the factor, or lower the population"
    )


def _rng(seed: int, generation: int, purpose: str) -> random.Random:
    return random.Random(f"{seed}/{generation}/{purpose}")


class Clock:
    """Seconds per category; ``compile`` is read from the pieces' trace-time calls."""

    def __init__(self, totals: dict[str, float] | None = None):
        self.totals = dict(totals or {"compile": 0.0, "inherit": 0.0, "train": 0.0, "other": 0.0})

    def add(self, category: str, seconds: float) -> None:
        self.totals[category] += seconds


class Evolution:
    """The host loop's state and steps; :func:`evolve` runs it as a stage."""

    def __init__(self, config: Any, image_shape: tuple[int, int, int], num_classes: int, mesh):
        """Everything but the data (see :meth:`attach`), so compiling can start before it loads."""
        self.config, self.ec, self.sc = config, config.evolution, config.supernet
        self.image_shape, self.mesh = tuple(image_shape), mesh
        self.dataset: input_pipeline.Dataset | None = None
        self.skeleton = arch_lib.skeleton_from_config(config.model, num_classes)
        self.reference = genome_lib.reference(config.genome.reference)
        self.constraints = []
        for size, c_in, c_out, stride in self.skeleton.layer_shapes(self.image_shape[0]):
            ref_cost = madds.cell_cost(self.reference, size, c_in, c_out, stride).madds
            self.constraints.append(
                Constraints(
                    stride,
                    c_in,
                    c_out,
                    size,
                    self.ec.max_madds_factor * ref_cost,
                    config.genome.palette,
                )
            )
        self.tx = sn.optimizer(self.sc.weight_decay, self.sc.momentum, self.sc.nesterov)
        self.bank = WeightBank(self.skeleton, self.image_shape, self.tx, config.seed)
        self.populations: list[list[Individual]] = []
        self.generation = 0
        self.step = 0
        self.history: list[list[list[dict]]] = []
        self.children: list[dict[str, Any]] = []
        self.losses: list[float] = []
        # Compiling generation t+1's new cells while t trains needs them known
        # before t+1 starts: a child born at the end of generation t can be picked
        # from t+2 on (always, so results do not depend on background_compile).
        threads = os.cpu_count() or 1
        self.compiler = pieces.Compiler(threads) if self.ec.background_compile else None
        self.compiled: set[Any] = set()  # "shared", and (layer, canonical genome) of each cell.
        self.warmup_steps = 0  # Weight-only steps; set by attach (needs the data's size).
        self.total_steps = self.ec.generations * self.ec.steps_per_generation

    # --- state ------------------------------------------------------------------------

    def attach(self, dataset: input_pipeline.Dataset) -> None:
        """The data to train on; its shapes must be those the supernet was built for."""
        info = dataset.info
        expected = (self.image_shape, self.skeleton.num_classes)
        if (info.image_shape, info.num_classes) != expected:
            raise ValueError(
                f"evolve: the loaded data has images {info.image_shape} and "
                f"{info.num_classes} classes; input_pipeline.peek said {expected}"
            )
        steps_per_epoch = dataset.steps_per_epoch(self.sc.batch_size)
        if self.sc.warmup_epochs * steps_per_epoch >= self.total_steps:
            config_checks.fail(
                "supernet.warmup_epochs",
                self.sc.warmup_epochs,
                f"0 to {(self.total_steps - 1) // steps_per_epoch}: an epoch is "
                f"{steps_per_epoch} steps here and evolve runs {self.total_steps} "
                "(evolution.generations x evolution.steps_per_generation), so alpha would "
                "never be trained (or raise those)",
            )
        self.dataset, self.warmup_steps = dataset, self.sc.warmup_epochs * steps_per_epoch

    def init(self) -> None:
        """Fresh populations; their weights come from :meth:`init_weights`."""
        use_ref = self.reference if self.ec.use_reference else None
        for l, cons in enumerate(self.constraints):
            rng = _rng(self.config.seed, -1, f"init/{l}")
            genomes = initial_population(cons, self.ec.population_size, rng, use_ref, self.ec.tau)
            alphas = np.random.default_rng((self.config.seed, l)).standard_normal(len(genomes))
            self.populations.append(
                [
                    Individual(g, float(a * self.sc.fitness_init_std))
                    for g, a in zip(genomes, alphas)
                ]
            )
        self._record()

    def init_weights(self) -> None:
        """Fresh stem, head and cells of the populations :meth:`init` made."""
        self.bank.init_shared()
        for l, pop in enumerate(self.populations):
            for ind in pop:
                self.bank.add(l, ind.genome)

    def _record(self) -> None:
        """history[t][l]: layer l's population (id, alpha) before generation t; t = T: final."""
        self.history.append(
            [[{"id": i.genome.id, "alpha": i.alpha} for i in pop] for pop in self.populations]
        )

    def meta(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "step": self.step,
            "populations": [[ind.to_json() for ind in pop] for pop in self.populations],
            "history": self.history,
            "children": self.children,
            "losses": self.losses,
        }

    def load_meta(self, meta: dict[str, Any]) -> None:
        self.generation, self.step = meta["generation"], meta["step"]
        self.populations = [[Individual.from_json(i) for i in pop] for pop in meta["populations"]]
        self.history, self.children = meta["history"], meta["children"]
        self.losses = meta["losses"]

    def genomes(self) -> list[list[genome_lib.Genome]]:
        return [[ind.genome for ind in pop] for pop in self.populations]

    # --- one generation ---------------------------------------------------------------

    def learning_rate(self, step: int) -> float:
        """Cosine decay of the weights' learning rate over the whole stage."""
        return (
            0.5 * self.sc.learning_rate * (1 + math.cos(math.pi * step / max(self.total_steps, 1)))
        )

    def select(self) -> list[list[int]]:
        """Step 1: per layer, tournament selection among the individuals old enough to be
        compiled. A pure function of (seed, generation, populations)."""
        t, ec = self.generation, self.ec
        rng = _rng(self.config.seed, t, "select")
        picked = []
        for pop in self.populations:
            ready = [i for i, ind in enumerate(pop) if ind.birth == 0 or ind.birth < t]
            chosen = tournament([pop[i] for i in ready], ec.cells_per_layer, ec.tournament_size,
                                rng)  # fmt: skip
            picked.append([ready[j] for j in chosen])
        return picked

    def prepare(self, picked: list[list[int]] | None = None) -> None:
        """Starts compiling what this generation needs and is not compiled yet, one thread
        per core: its picked cells (``picked``, or :meth:`select`'s; generation 0's, a
        resumed run's) and, the first time, the stem and head. Returns at once: the
        caller loads data or assembles the supernet meanwhile, and
        :meth:`run_generation` waits for the rest."""
        if self.compiler is None or self.generation >= self.ec.generations:
            return
        if "shared" not in self.compiled:
            self.compiled.add("shared")
            self.compiler.submit("shared", self._compile_shared, urgent=True)
        for key in self._picked_keys(self.select() if picked is None else picked):
            if key not in self.compiled:
                self.compiled.add(key)
                self.compiler.submit(key, pieces.precompile_cell, *self._compile_job(*key),
                                     urgent=True)  # fmt: skip

    def run_generation(self, clock: Clock, writer) -> dict[str, float]:
        t, ec, seed = self.generation, self.ec, self.config.seed
        picked = self.select()
        self.prepare(picked)
        # 2. The supernet of the picked cells, weights from the bank.
        start = time.time()
        spec = sn.SupernetSpec(
            self.skeleton,
            [[self.populations[l][i].genome for i in idx] for l, idx in enumerate(picked)],
        )
        trainer = sn.SupernetTrainer.from_config(spec, self.sc)
        alphas = [
            np.array([self.populations[l][i].alpha for i in idx]) for l, idx in enumerate(picked)
        ]
        state = self.bank.assemble(trainer, alphas, self.step, sharding.replicated(self.mesh))
        n = self.step + ec.steps_per_generation
        compensation = [
            sn.compensation_factor(
                np.full(len(idx), n),
                [self.populations[l][i].n_prime + ec.steps_per_generation for i in idx],
                self.sc.compensation_clip,
            )
            for l, idx in enumerate(picked)
        ]
        clock.add("inherit", time.time() - start)
        if self.compiler is not None:  # Assembled while they compiled.
            clock.add("compile", self.compiler.wait(["shared", *self._picked_keys(picked)]))
        self._precompile_rest(picked)
        # 3. f iterations.
        start, compiled = time.time(), pieces.compile_seconds()
        data = sharding.batch_sharding(self.mesh)
        warmup = self.warmup_steps
        losses, first_step, where = [], self.step + 1, f"generation {t}"
        for _ in range(ec.steps_per_generation):
            batch = self.dataset.train_batch(self.step, self.sc.batch_size, data, seed=seed)
            metrics = trainer.weight_step(state, *batch, self.learning_rate(self.step), seed)
            losses.append(metrics["loss"])
            if self.step >= warmup:
                val = self.dataset.train_batch(
                    self.step, self.sc.batch_size, data, seed=seed, split="val"
                )
                trainer.fitness_step(state, *val, self.sc.fitness_learning_rate, seed, compensation)
                alphas = trainer.alphas(state)
                failures.check_alphas(STAGE, self.step + 1, alphas, first_step, losses, where)
            self.step += 1
        losses = jax.device_get(losses)  # One transfer for the check and the mean.
        failures.check_steps(STAGE, first_step, [{"loss": v} for v in losses], where)
        loss = float(np.mean([float(v) for v in losses]))
        compile_s = pieces.compile_seconds() - compiled
        clock.add("compile", compile_s)
        clock.add("train", time.time() - start - compile_s)
        # 4-6. Eq. 5, n', mutation with inheritance, removal.
        start = time.time()
        self.bank.store(trainer, state)
        alpha_star = trainer.alphas(state)  # Finite: checked after each fitness step.
        for l, idx in enumerate(picked):
            for k, i in enumerate(idx):
                ind = self.populations[l][i]
                ind.alpha = momentum_update(float(alpha_star[l][k]), ind.alpha, ec.momentum)
                ind.n_prime += ec.steps_per_generation
        self._reproduce(picked)
        self.generation += 1
        self.losses.append(loss)
        self._record()
        clock.add("inherit", time.time() - start)
        return {"supernet_loss": loss, "compile_s": compile_s}

    def _compile_job(self, l: int, genome: genome_lib.Genome) -> tuple:
        """Arguments of :func:`pieces.precompile_cell` for ``genome`` in layer ``l``."""
        cons = self.constraints[l]
        x = jax.ShapeDtypeStruct(
            (self.sc.batch_size, cons.size, cons.size, cons.c_in), np.float32,
            sharding=sharding.batch_sharding(self.mesh),
        )  # fmt: skip
        return (
            sn.piece_cell(genome, cons.c_out, cons.stride),
            x,
            sharding.replicated(self.mesh),
            self.tx,
        )

    def _picked_keys(self, picked: list[list[int]]) -> list[tuple[int, genome_lib.Genome]]:
        return [
            (l, genome_lib.canonical(self.populations[l][i].genome))
            for l, idx in enumerate(picked)
            for i in idx
        ]

    def _compile_shared(self) -> None:
        """Stem and head programs, as the supernet trainer will call them."""
        sk, bs = self.skeleton, self.sc.batch_size
        data, replicated = sharding.batch_sharding(self.mesh), sharding.replicated(self.mesh)
        images = jax.ShapeDtypeStruct((bs, *self.image_shape), np.float32, sharding=data)
        pieces.precompile_cell(cells.Stem(sk.stem, sk.stem_stride), images, replicated, self.tx)
        head_in = sk.head_shape(self.image_shape[0])
        x = jax.ShapeDtypeStruct((bs, *head_in), np.float32, sharding=data)
        labels = jax.ShapeDtypeStruct((bs,), np.int32, sharding=data)
        head = cells.Head(sk.head, sk.num_classes)
        pieces.precompile_head(head, x, labels, self.sc.label_smoothing, replicated, self.tx)

    def _precompile_rest(self, picked: list[list[int]]) -> None:
        """Queues every individual not compiled yet, except this generation's picks
        (compiled by now, or on first use), fittest first, for the background compiler."""
        todo = []
        for l, pop in enumerate(self.populations):
            for i, ind in enumerate(pop):
                key = (l, genome_lib.canonical(ind.genome))
                if key not in self.compiled:
                    self.compiled.add(key)
                    if i not in picked[l]:
                        todo.append((-ind.alpha, l, ind.genome.id, key[1]))
        if self.compiler is None:
            return
        for _, l, _, genome in sorted(todo, key=lambda job: job[:3]):
            self.compiler.submit((l, genome), pieces.precompile_cell, *self._compile_job(l, genome))

    def _reproduce(self, picked: list[list[int]]) -> None:
        t, ec = self.generation, self.ec
        first_half = t < ec.generations / 2
        reference = self.reference if (ec.use_reference and first_half) else None
        rng = _rng(self.config.seed, t, "mutate")
        for l, idx in enumerate(picked):
            pop, cons = self.populations[l], self.constraints[l]
            parents = sorted(idx, key=lambda i: (-pop[i].alpha, pop[i].genome.id))[: ec.offspring]
            for i in parents:
                parent = pop[i]
                taken = {ind.genome for ind in pop}
                child = mutate_within(parent.genome, cons, taken, rng, reference, ec.tau)
                if child is None:
                    logging.warning(
                        "evolve: layer %d, no allowed child of %s after %d tries",
                        l,
                        parent.genome,
                        MAX_TRIES,
                    )
                    continue
                inherited = self.bank.add(l, child, parent=parent.genome)
                pop.append(Individual(child, parent.alpha, 0, t + 1))
                self.children.append(
                    {
                        "generation": t,
                        "layer": l,
                        "parent": parent.genome.to_json(),
                        "child": child.to_json(),
                        "madds": cons.madds(child),
                        "max_madds": cons.max_madds,
                        "hamming_to_reference": genome_lib.hamming(child, self.reference),
                        "first_half": first_half,
                        "inherited": inherited,
                    }
                )
            while len(pop) > ec.population_size:
                if ec.removal == "oldest":
                    victim = min(pop, key=lambda ind: (ind.birth, ind.alpha, ind.genome.id))
                else:
                    victim = min(pop, key=lambda ind: (ind.alpha, ind.birth, ind.genome.id))
                pop.remove(victim)
                self.bank.remove(l, victim.genome)

    # --- result -----------------------------------------------------------------------

    def learned_space(self) -> list[list[Individual]]:
        """Top-K individuals per layer by alpha."""
        k = self.ec.cells_per_layer
        return [sorted(pop, key=lambda i: (-i.alpha, i.genome.id))[:k] for pop in self.populations]

    def space_json(self) -> dict[str, Any]:
        layers = []
        for cons, top in zip(self.constraints, self.learned_space()):
            layers.append(
                [
                    {
                        "genome": i.genome.to_json(),
                        "id": i.genome.id,
                        "alpha": i.alpha,
                        "madds": cons.madds(i.genome),
                        "params": madds.cell_cost(
                            i.genome, cons.size, cons.c_in, cons.c_out, cons.stride
                        ).params,
                    }
                    for i in top
                ]
            )
        return {
            "skeleton": self.skeleton.to_json(),
            "palette": self.config.genome.palette,
            "layers": layers,
            "config": self.config.to_dict(),
        }


def evolve(config: Any, workdir: str) -> dict[str, Any]:
    """Runs (or resumes, or skips) the evolve stage; writes ``<workdir>/evolve/``.

    Returns:
      The summary dict (also written to summary.json).
    """
    start_time = time.time()
    stage_dir = os.path.join(workdir, STAGE)
    summary_path = os.path.join(stage_dir, "summary.json")
    ec = config.evolution
    summary = files.finished(summary_path, lambda s: s.get("generations") == ec.generations)
    if summary is not None:
        return summary

    background_before = pieces.background_compile_seconds()
    mesh = sharding.create_mesh()
    sharding.check_batch_size(config.supernet.batch_size, mesh, "supernet.batch_size")
    # An npz's shapes are known before its images are decoded: the first generation's
    # programs then compile while the data loads (evo.prepare below).
    dataset, peeked = None, input_pipeline.peek(config.data)
    if peeked is None:
        dataset = input_pipeline.load(config.data, seed=config.seed, cache_dir=workdir)
        peeked = (dataset.info.image_shape, dataset.info.num_classes)
    evo = Evolution(config, *peeked, mesh)
    if dataset is not None:
        evo.attach(dataset)  # Bad settings fail here, before anything compiles.
    ckpt = checkpoint.Checkpointer(
        os.path.join(stage_dir, "checkpoints"), max_to_keep=2, stage=STAGE
    )
    elapsed, clock, setup_s = 0.0, Clock(), time.time() - start_time
    writer = writers.create_writer(stage_dir)
    try:
        start = time.time()  # The bank's side of inheritance: restored, or fresh populations.
        if ckpt.latest_step() is not None:
            replicated = sharding.replicated(mesh)

            def target(meta: dict[str, Any]) -> Any:
                """The bank's structure for this step's populations (which genomes it holds)."""
                evo.load_meta(meta["evolution"])
                return jax.tree.map(
                    lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                    evo.bank.abstract_pytree(evo.genomes()),
                )

            # The newest readable step; evo then holds that same step's meta (the last
            # target call).
            _, tree, meta = ckpt.restore_latest(target)
            elapsed, clock = meta["elapsed_s"], Clock(meta["clock"])
            evo.prepare()
            evo.bank.load_pytree(tree, evo.genomes())
            logging.info(
                "evolve: resumed after generation %d of %d", evo.generation, ec.generations
            )
        else:
            evo.init()
            evo.prepare()
            evo.init_weights()
        clock.add("other", setup_s)  # Added only now: a resume replaces the clock.
        clock.add("inherit", time.time() - start)
        start = time.time()
        if evo.dataset is None:
            evo.attach(input_pipeline.load(config.data, seed=config.seed, cache_dir=workdir))
        clock.add("other", time.time() - start)
        while evo.generation < ec.generations:
            t = evo.generation
            figures = evo.run_generation(clock, writer)
            start = time.time()
            if evo.generation % ec.checkpoint_every == 0 or evo.generation == ec.generations:
                run_s = elapsed + time.time() - start_time
                ckpt.save(
                    evo.generation,
                    evo.bank.to_pytree(),
                    {"evolution": evo.meta(), "elapsed_s": run_s, "clock": clock.totals},
                )
            clock.add("inherit", time.time() - start)
            best = [max(i.alpha for i in pop) for pop in evo.populations]
            writer.write_scalars(
                t,
                {
                    **figures,
                    **{f"alpha_max/layer_{l}": a for l, a in enumerate(best)},
                    **{f"time/{k}_s": v for k, v in clock.totals.items()},
                },
            )
            logging.info(
                "evolve: generation %d/%d  loss %.4f  "
                "compile %.1fs inherit %.1fs train %.1fs (totals)",
                t + 1,
                ec.generations,
                figures["supernet_loss"],
                clock.totals["compile"],
                clock.totals["inherit"],
                clock.totals["train"],
            )
    finally:  # Even on failure: a save in flight completes, the compile threads stop.
        start = time.time()
        ckpt.close()
        if evo.compiler is not None:
            evo.compiler.close()
    space = evo.space_json()
    distributed.check_same("evolve: the learned space", space)
    files.write_json(os.path.join(stage_dir, "space.json"), space)
    files.write_json(os.path.join(stage_dir, "children.json"), evo.children)
    populations = [[ind.to_json() for ind in pop] for pop in evo.populations]
    files.write_json(
        os.path.join(stage_dir, "history.json"),
        {"history": evo.history, "populations": populations},
    )
    learned = [[(i.genome, i.alpha) for i in top] for top in evo.learned_space()]
    plots.plot_fitness_history(evo.history, os.path.join(stage_dir, "plots", "alpha_history.png"))
    plots.draw_cells(learned, os.path.join(stage_dir, "plots", "learned_cells.png"))
    writer.close()
    clock.add("other", time.time() - start)
    wall = elapsed + time.time() - start_time
    summary = {
        "wall_time_s": wall,
        "generations": ec.generations,
        "steps": evo.step,
        "compile_time_s": clock.totals["compile"],
        "background_compile_time_s": pieces.background_compile_seconds() - background_before,
        "inherit_time_s": clock.totals["inherit"],
        "train_time_s": clock.totals["train"],
        "other_time_s": clock.totals["other"],
        "supernet_loss": evo.losses,
        "children": len(evo.children),
        "config": config.to_dict(),
    }
    files.write_json(summary_path, summary)
    madds_table = [[layer["madds"] for layer in layers] for layers in space["layers"]]
    logging.info("evolve: learned space\n%s", plots.space_table(learned, madds_table))
    return summary
