"""NAS inside a space (paper §3.3, §4, Eq. 6; DESIGN §6): ``--mode=search``.

Three algorithms behind one interface, ``run(ctx) -> (choose, figures)``, found
in :data:`ALGORITHMS`: ``run`` trains the supernet (and what the algorithm
learns beside it) for ``ctx.target``; ``choose(target)`` returns the path for a
target in the cost's unit, so one search serves every target of a front
(``search.targets``). The algorithms: ``proxyless`` (gradient, ProxylessNAS-G), ``rl``
(REINFORCE, ProxylessNAS-RL) and ``spos`` (single-path one-shot + evolutionary
search). The stage driver lives in ``stage.py``.
"""

from autospace_jax.search import proxyless, rl, spos

ALGORITHMS = {"proxyless": proxyless.run, "rl": rl.run, "spos": spos.run}
