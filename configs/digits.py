"""scikit-learn's bundled digits (8x8 grayscale, 10 classes): the CPU default.

Runs the whole method (evolve, search, train) in about 70 s on 2 CPU cores:

python -m autospace_jax.main --config=configs/digits.py --workdir=runs/digits
"""

from configs import default


def get_config():
    c = default.get_config()
    c.data.source = "digits"
    c.mode = "pipeline"  # evolve -> search (proxyless in the learned space) -> train.
    c.search.space = "learned"
    return c
