"""CIFAR-10 from an npz (e.g. ../shared/data/cifar10_jpeg_bytes.npz) or TFDS.

  python -m autospace_jax.main --config=configs/cifar10.py --workdir=runs/cifar10 \
      --config.data.path=../shared/data/cifar10_jpeg_bytes.npz
  # or, with TFDS prepared in a data_dir:
  python -m autospace_jax.main --config=configs/cifar10.py --workdir=runs/cifar10 \
      --config.data.source=tfds:cifar10 --config.data.data_dir=$TFDS_DATA_DIR
"""

from configs import default


def get_config():
    c = default.get_config()
    c.data.source = "npz"
    c.data.path = "../shared/data/cifar10_jpeg_bytes.npz"
    c.data.val_fraction = 0.1
    c.model.stem = 32
    c.model.widths = (24, 40, 80, 96, 192)
    c.model.blocks = (2, 2, 2, 1, 1)
    c.model.strides = (1, 2, 2, 1, 2)
    c.model.head = 512
    # Evolve's 200 steps are under one epoch (703 steps at batch 64): fitness steps
    # from the start, or alpha would never be trained.
    c.supernet.warmup_epochs = 0
    c.train.batch_size = 128
    c.train.epochs = 30
    c.train.weight_decay = 5e-4
    return c
