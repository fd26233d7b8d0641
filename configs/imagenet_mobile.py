"""The paper's ImageNet mobile setting: the ProxylessNAS skeleton (L = 21).

First conv 32 channels stride 2; stages of widths 24, 40, 80, 96, 192, 320 with
4, 4, 4, 4, 4, 1 layers and strides 2, 2, 2, 1, 2, 1; head 1280; 224x224.
Training follows paper §4.1 (lr 0.1, cosine, 250 epochs, batch 512, wd 1e-4,
10 warm-up epochs). Needs ImageNet prepared for TFDS in a data_dir:

  python -m autospace_jax.main --config=configs/imagenet_mobile.py \
      --workdir=gs://BUCKET/runs/imagenet --config.data.data_dir=gs://BUCKET/tfds
"""

from configs import default


def get_config():
    c = default.get_config()
    c.data.source = "tfds:imagenet2012"
    c.data.image_size = 224
    c.data.val_fraction = 0.02
    c.model.stem = 32
    c.model.stem_stride = 2
    c.model.widths = (24, 40, 80, 96, 192, 320)
    c.model.blocks = (4, 4, 4, 4, 4, 1)
    c.model.strides = (2, 2, 2, 1, 2, 1)
    c.model.head = 1280
    c.train.batch_size = 512
    c.train.eval_batch_size = 500
    c.train.epochs = 250
    c.train.learning_rate = 0.1
    c.train.warmup_epochs = 10
    c.train.weight_decay = 1e-4
    c.train.label_smoothing = 0.1
    c.train.eval_every_epochs = 10
    c.train.checkpoint_every_steps = 2000
    # Evolution: K = 9 cells per layer (paper §4.3); P, S, f, T sized for a pod.
    c.evolution.population_size = 36
    c.evolution.cells_per_layer = 9
    c.evolution.tournament_size = 4
    c.evolution.steps_per_generation = 500
    c.evolution.generations = 100
    c.evolution.offspring = 3
    c.supernet.batch_size = 512
    c.supernet.learning_rate = 0.1
    c.supernet.fitness_learning_rate = 6e-3  # ProxylessNAS.
    c.supernet.warmup_epochs = 10
    # Search at the paper's 300M+ budget (Table 3).
    c.search.target_madds = 330_000_000
    c.search.steps = 50_000
    c.search.warmup_steps = 20_000
    c.search.checkpoint_every_steps = 1000
    return c
