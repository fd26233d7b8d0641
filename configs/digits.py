"""scikit-learn's bundled digits (8x8 grayscale, 10 classes): the CPU default.

Runs the whole method (evolve, search, train) in about 90 s on 2 CPU cores:

python -m autospace_jax.main --config=configs/digits.py --workdir=runs/digits
"""

from configs import default


def get_config():
    c = default.get_config()
    c.data.source = "digits"
    c.mode = "pipeline"  # evolve -> search (proxyless in the learned space) -> train.
    c.search.space = "learned"
    # A smaller space than the default K = 7: digits is not compared with manual_irb
    # here, and a weight-sharing supernet over K distinct cells per layer trains more
    # slowly the larger K is (each cell runs in 1/K of the steps).
    c.evolution.population_size = 6
    c.evolution.cells_per_layer = 3
    c.evolution.offspring = 1
    # The paper's five ops: 5x5 and 7x7 depthwise kernels see little more of 8x8 images
    # than 3x3 ones, and on CPU they cost the most to compile and to run (shift form);
    # with them the README command took 160 s instead of 84 s (BENCHMARKS "Digits pipeline").
    c.genome.palette = "paper"
    return c
