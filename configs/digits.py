"""scikit-learn's bundled digits (8x8 grayscale, 10 classes): the CPU default.

python -m autospace_jax.main --config=configs/digits.py --workdir=runs/digits
"""

from configs import default


def get_config():
    c = default.get_config()
    c.data.source = "digits"
    return c
