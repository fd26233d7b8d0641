"""What a checkpoint of the evolve stage holds and how a run resumes from it.

:class:`Resumable` is the checkpoint half of
:class:`~autospace_jax.evolution.state.Evolution`: its JSON (:meth:`Resumable.meta`),
its arrays (the weight bank, and inside a generation a preemption stopped,
:class:`Interrupted`), the restore target built from a checkpoint's JSON, and where
the evolution stands as the log says it.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax
import numpy as np

from autospace_jax.evolution.population import Individual
from autospace_jax.runtime import sharding
from autospace_jax.supernet import trainer as trainer_lib


@dataclasses.dataclass
class Interrupted:
    """A generation stopped after ``len(losses)`` of its iterations by a preemption notice:
    what the bank does not hold and an exact continuation needs. The bank holds the
    generation's weights, BN statistics and their optimizer states so far."""

    step: int  # The supernet's step when it stopped.
    losses: list[float]  # Of the iterations run.
    fitness: dict[str, Any]  # The supernet's alpha, per layer ({"layer_l": {"alpha"}}).
    fitness_opt: dict[str, Any]  # Alpha's Adam states, per layer ("layer_l").
    # (layer, population index) -> weights before the generation of the children it
    # trains for the first time (evolution_report.record_first_update).
    before: dict[tuple[int, int], np.ndarray]

    def tree(self) -> dict[str, Any]:
        """The arrays, as the checkpoint holds them beside the bank."""
        return {"fitness": self.fitness, "fitness_opt": self.fitness_opt,
                "before": list(self.before.values())}  # fmt: skip

    def meta(self) -> dict[str, Any]:
        """The rest, JSON; with :meth:`tree` what :meth:`Evolution.load` reads back."""
        before = [[l, i, int(v.size)] for (l, i), v in self.before.items()]
        return {"step": self.step, "losses": self.losses, "before": before}


class Resumable:
    """Checkpoint and restore of :class:`~autospace_jax.evolution.state.Evolution`, whose
    attributes these methods read and write."""

    def meta(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "warmup_rounds": self.warmup_rounds,
            "step": self.step,
            "populations": [[ind.to_json() for ind in pop] for pop in self.populations],
            "history": self.history,
            "children": self.children,
            "rejected": dict(self.rejected),
            "losses": self.losses,
            "validation": self.validation,
            "final": self.final,
            "latency": self.timer.state if self.timer else None,
            "warmup_end": self.warmup_end,
            "warmup_steps": self.warmup_steps,
        }

    def load_meta(self, meta: dict[str, Any]) -> None:
        self.generation, self.step = meta["generation"], meta["step"]
        self.populations = [[Individual.from_json(i) for i in pop] for pop in meta["populations"]]
        self.history, self.children = meta["history"], meta["children"]
        self.rejected = collections.Counter(meta["rejected"])
        self.losses, self.final = meta["losses"], meta["final"]
        self.validation = meta.get("validation", [])  # Absent from older checkpoints.
        self.warmup_end = meta.get("warmup_end")
        # Known before attach (which computes it again from the data's size): a resume
        # selects its first round's cells while an npz's images still decode.
        self.warmup_steps = meta.get("warmup_steps", self.warmup_steps)
        # Absent from checkpoints of before warm-up rounds (their warm-up spent generations).
        self.warmup_rounds = meta.get("warmup_rounds", 0)
        if self.timer and meta.get("latency"):
            self.timer.load(meta["latency"])

    def checkpoint(self) -> tuple[int, dict[str, Any], dict[str, Any]]:
        """(step, arrays, JSON) of a checkpoint: after a generation, or inside the one a
        preemption stopped (:attr:`interrupted`), numbered by the supernet's step."""
        tree, meta = self.bank.to_pytree(), {"evolution": self.meta()}
        if self.interrupted is None:
            return self.step, tree, meta
        tree["generation"], meta["generation"] = self.interrupted.tree(), self.interrupted.meta()
        return self.interrupted.step, tree, meta

    def restore_target(self, meta: dict[str, Any]) -> dict[str, Any]:
        """The arrays of the checkpoint whose JSON is ``meta``, as ``jax.ShapeDtypeStruct``
        placed on the mesh (a restore target); this state is then ``meta``'s."""
        self.load_meta(meta["evolution"])
        tree = self.bank.abstract_pytree(self.genomes())
        if "generation" in meta:

            def vector(n: int) -> jax.ShapeDtypeStruct:
                return jax.ShapeDtypeStruct((n,), np.float32)

            fitness = {f"layer_{l}": {"alpha": vector(len(idx))}
                       for l, idx in enumerate(self.select())}  # fmt: skip
            opt = {l: jax.eval_shape(self.tx.init, {"fitness": a}) for l, a in fitness.items()}
            before = [vector(n) for _, _, n in meta["generation"]["before"]]
            tree["generation"] = {"fitness": fitness, "fitness_opt": opt, "before": before}
        # The cells where a supernet stores them (SupernetTrainer.place), the rest whole.
        spread = trainer_lib.spreads(self.settings.program, self.mesh)

        def place(s, cell: bool):
            where = sharding.spread(self.mesh, s.shape) if cell else sharding.replicated(self.mesh)
            return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where)

        return {part: jax.tree.map(lambda s, c=part == "cells" and spread: place(s, c), sub)
                for part, sub in tree.items()}  # fmt: skip

    def load(self, tree: dict[str, Any], meta: dict[str, Any]) -> None:
        """The arrays of a checkpoint whose JSON :meth:`restore_target` read."""
        self.bank.load_pytree(tree, self.genomes())
        if "generation" in meta:
            g, arrays = meta["generation"], tree["generation"]
            before = {(l, i): np.asarray(v) for (l, i, _), v in zip(g["before"], arrays["before"])}
            self.interrupted = Interrupted(
                g["step"], g["losses"], arrays["fitness"], arrays["fitness_opt"], before
            )

    def position(self) -> str:
        """Where the evolution stands, between generations or inside the one a preemption
        stopped, as the log says it."""
        if self.interrupted is None:
            return f"after {self.label(self.generation - 1)}"
        return (f"in {self.label(self.generation)} after iteration "
                f"{len(self.interrupted.losses)} of {self.ec.steps_per_generation}")  # fmt: skip
