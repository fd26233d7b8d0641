"""Several processes split evolve's cells (``Precompiler``): who compiles what, and no
process left waiting for a cell its owner dropped."""

import threading
import types

import jax
import jax.numpy as jnp
import numpy as np

from autospace_jax.nn import cells
from autospace_jax.runtime import sharding
from autospace_jax.space import genome as g
from autospace_jax.supernet import model as sn
from autospace_jax.supernet import pieces, precompile


def test_processes_split_cells_in_queue_order_and_a_dropped_cell_is_still_sent(monkeypatch):
    """Process 0 of 2 compiles the 1st and 3rd cells queued and waits for the others'. The
    3rd, dropped before it ran, is sent empty (process 1 waits for it); the 4th, a receive,
    runs anyway (its sender counts its readers). Closing sends nothing twice."""
    monkeypatch.setattr(precompile.jax, "process_count", lambda: 2)
    monkeypatch.setattr(precompile.jax, "process_index", lambda: 0)
    sent, received, release = [], [], threading.Event()
    monkeypatch.setattr(precompile.distributed, "send", lambda key, data: sent.append(key))
    evo = types.SimpleNamespace(settings=types.SimpleNamespace(platform="cpu"))
    pre = precompile.Precompiler(evo, enabled=True)
    pre.compiled.add("shared")  # Stem and head: every process compiles its own.
    compiled = []
    monkeypatch.setattr(
        pre, "_compile_cell", lambda l, genome, message: (release.wait(), compiled.append(l))
    )
    monkeypatch.setattr(pre, "_load_cell", lambda l, genome, message: received.append(message))
    cells = [(l, g.reference()) for l in range(4)]
    pre.ready([], [(l, key) for l, key in enumerate(cells)])  # One background thread.
    messages = [f"autospace/cells/{i}/{i}/{cells[i][1].id}" for i in range(4)]
    assert pre.sending == {cells[0]: messages[0], cells[2]: messages[2]}
    pre.forget(cells[2:])
    assert sent == [messages[2]]  # Cancelled while the first still compiled: sent empty.
    release.set()
    pre.close()
    assert compiled == [0] and sorted(received) == [messages[1], messages[3]]
    assert sent == [messages[2]]


def test_a_cell_loaded_from_another_process_runs_the_loaded_programs():
    """What a process receives (``pieces.Publish`` there, ``pieces.Load`` here) is what the
    step then runs for the cell, with the values its own compile would give."""
    mesh = sharding.create_mesh()
    rep = sharding.replicated(mesh)
    tx = sn.optimizer(4e-5, 0.9, True, 0.5)
    module = cells.piece_cell(g.reference(), 12, 1)  # Shapes no other test compiles.
    x = jax.ShapeDtypeStruct((8, 6, 6, 12), jnp.float32, sharding=sharding.batch_sharding(mesh))
    publish = pieces.Publish()
    pieces.precompile_cell(module, x, rep, tx, share=publish)
    assert set(publish.blobs) == {"forward", "backward_update"}

    images = jax.device_put(jax.random.normal(jax.random.key(0), x.shape), x.sharding)
    variables = jax.device_put(module.init(jax.random.key(1), images, train=False), rep)

    def step():
        y, _, vjp = pieces.forward(module, variables, images)
        params, _, dx = pieces.backward_update(
            module, tx, vjp, jnp.ones_like(y), jax.tree.map(jnp.copy, variables["params"]),
            tx.init({"params": variables["params"]}), 0.1,
        )  # fmt: skip
        return y, params, dx

    own = step()
    pieces.release([module])  # As a process that never compiled the cell.
    pieces.precompile_cell(module, x, rep, tx, share=pieces.Load(module, publish.blobs,
                                                                  mesh.devices.flat))  # fmt: skip
    ran = []
    for key, (signature, program) in list(pieces._LOADED.items()):
        if key[0] == module:
            pieces._LOADED[key] = (
                signature,
                lambda *a, p=program, n=key[1]: ran.append(n) or p(*a),
            )
    loaded = step()
    assert ran == ["forward", "backward_update"]
    for a, b in zip(jax.tree.leaves(own), jax.tree.leaves(loaded)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    pieces.release([module])
    assert not any(key[0] == module for key in pieces._LOADED)
