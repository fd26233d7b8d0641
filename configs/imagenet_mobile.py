"""The paper's ImageNet mobile setting, every stage: ProxylessNAS skeleton (L = 21), K = 9.

Skeleton (ProxylessNAS-mobile, paper §3.2 "following [2, 31]"): a 3x3 stem conv
of 32 channels with stride 2; 21 searchable layers in stages of widths 24, 40,
80, 96, 192, 320 with 4, 4, 4, 4, 4, 1 layers, the first layer of each stage
with stride 2, 2, 2, 1, 2, 1; a 1x1 conv to 1280 channels; 1000 classes;
224x224 inputs. ProxylessNAS's fixed first block (MBConv1 3x3, 32 -> 16
channels) has no place in this library's skeleton: layer 0 reads the stem.

Where the values come from:

* evolve (paper §3.2, §4.3, supplementary): K = 9 cells per layer; reference
  regularisation (tau) during the first half of the evolution, which the paper
  gives as its first 60 epochs: T = 120 generations of f = one epoch each.
  P, S, offspring, epsilon, tau and MAdds_max are not in the paper: this
  library's choices.
* supernet (evolve and search), as ProxylessNAS's ImageNet search
  (mit-han-lab/proxylessnas ``search/imagenet_arch_search.py``): batch 256,
  lr 0.025 with cosine decay, Nesterov momentum 0.9, weight decay 4e-5, label
  smoothing 0.1, Adam lr 1e-3 on alpha, alpha ~ N(0, 1e-3), 40 warm-up epochs
  then 120 epochs for the search.
* search (paper §3.3, §4.2): ProxylessNAS-G in the learned space, pulled onto a
  MAdds budget of Table 3. ``BUDGETS`` holds its four bands; the target is the
  band's middle and the tolerance its half-width, so the chosen network lies in
  the band. The RL and RS (SPOS) settings of Table 4 follow MnasNet's reward
  exponent and SPOS's evolutionary search (population 50, 20 iterations, top
  10, BN recalibrated on about 20,000 training images).
* train (paper §4.1): lr 0.1, cosine, 250 epochs, batch 512, weight decay 1e-4,
  10 warm-up epochs, label smoothing 0.1, no extra augmentation (Inception
  crop and flip only).
* train, option ``table7`` (paper Table 7, the EfficientNet-B0-style setting):
  squeeze-and-excitation of ratio 0.25 in every cell, a moving average of the
  weights with decay 0.9999, RandAugment with 2 ops of magnitude 9.

Needs ImageNet prepared for TFDS as ArrayRecord, e.g. with
``tfds build imagenet2012 --file_format=array_record``. The whole method at the
300M+ budget:

  python -m autospace_jax.main --config=configs/imagenet_mobile.py \
      --workdir=runs/imagenet --config.data.data_dir=/data/tensorflow_datasets

Another budget: ``--config=configs/imagenet_mobile.py:100M`` (100M, 300M, 400M
or 500M); one stage: ``--mode=evolve``, ``search`` or ``train``. Table 7's
training: ``--config=configs/imagenet_mobile.py:300M,table7`` (options follow the
budget, comma-separated). On a TPU VM or a pod slice, pass the same ``--config``
to ``launch/tpu.sh``.
"""

import ml_collections

from autospace_jax.runtime import errors
from configs import default

IMAGENET_TRAIN_IMAGES = 1_281_167

# Table 3's MAdds budgets: name -> the band (low, high) its searched models span.
BUDGETS = {
    "100M": (100_000_000, 200_000_000),
    "300M": (300_000_000, 400_000_000),
    "400M": (400_000_000, 500_000_000),
    "500M": (500_000_000, 700_000_000),
}


def steps_per_epoch(val_fraction: float, batch_size: int) -> int:
    """Full batches per epoch of the train split left after the validation split."""
    train_images = IMAGENET_TRAIN_IMAGES - round(val_fraction * IMAGENET_TRAIN_IMAGES)
    return train_images // batch_size


# Options that may follow the budget.
OPTIONS = ("table7",)


def parse(arg: str) -> tuple[str, list[str]]:
    """``"300M,table7"`` -> ("300M", ["table7"]): the budget, then options."""
    budget, *options = arg.split(",")
    if budget not in BUDGETS:
        raise errors.ConfigError(
            f"configs/imagenet_mobile.py budget {budget!r} is unknown; accepted: {list(BUDGETS)}"
        )
    for option in options:
        if option not in OPTIONS:
            raise errors.ConfigError(
                f"configs/imagenet_mobile.py option {option!r} is unknown; accepted: "
                f"{list(OPTIONS)}, after the budget (e.g. '300M,table7')"
            )
    return budget, options


def get_config(arg: str = "300M") -> ml_collections.ConfigDict:
    budget, options = parse(arg)
    c = default.get_config()
    c.mode = "pipeline"  # evolve -> search (in the learned space) -> train.
    c.data.source = "tfds:imagenet2012"
    c.data.image_size = 224
    # Decode + crop of 224 px JPEGs: ~400 images/s per core (BENCHMARKS "Input
    # pipeline"); a TPU v4 host has 240 vCPUs for 4 chips.
    c.data.workers = 16
    c.data.val_fraction = 0.02  # 25,623 images for the fitness/arch steps and validation.

    c.model.stem = 32
    c.model.stem_stride = 2
    c.model.widths = (24, 40, 80, 96, 192, 320)
    c.model.blocks = (4, 4, 4, 4, 4, 1)
    c.model.strides = (2, 2, 2, 1, 2, 1)
    c.model.head = 1280

    c.supernet.batch_size = 256
    c.supernet.learning_rate = 0.025
    c.supernet.label_smoothing = 0.1
    c.supernet.fitness_learning_rate = 1e-3
    c.supernet.warmup_epochs = 10  # Evolve: 10 rounds of weight steps only, then T generations.
    # supernet.compile_effort stays XLA's default: -1 compiles a child 3-5x faster for a
    # TPU, but its step time there is unmeasured (BENCHMARKS "TPU compile: how to read it").
    epoch = steps_per_epoch(c.data.val_fraction, c.supernet.batch_size)  # 4,904.

    c.evolution.population_size = 36
    c.evolution.cells_per_layer = 9
    c.evolution.tournament_size = 4
    c.evolution.steps_per_generation = epoch
    c.evolution.generations = 120  # tau applies to the first 60.
    c.evolution.offspring = 3
    c.evolution.fitness_batch_size = 256  # One supernet batch, as ProxylessNAS's arch steps.

    low, high = BUDGETS[budget]
    c.search.space = "learned"
    c.search.target_madds = (low + high) // 2
    c.search.tolerance = (high - low) / (high + low)
    c.search.steps = 160 * epoch
    c.search.warmup_steps = 40 * epoch
    c.search.checkpoint_every_steps = 1000
    c.search.bn_batches = 80  # 20,480 images.
    c.search.rl_samples = 10
    c.search.rl_baseline_decay = 0.99
    c.search.rl_madds_exponent = -0.07
    c.search.spos_population = 50
    c.search.spos_iterations = 20
    c.search.spos_parents = 10

    c.train.batch_size = 512
    c.train.eval_batch_size = 512  # A multiple of every slice's device count (v4-32: 16).
    c.train.epochs = 250
    c.train.warmup_epochs = 10
    c.train.weight_decay = 1e-4
    c.train.log_every_steps = 100
    c.train.checkpoint_every_steps = 2000

    if "table7" in options:  # EfficientNet-B0's training tricks on the searched network.
        c.train.se_ratio = 0.25
        c.train.ema_decay = 0.9999
        c.data.rand_augment = "2,9"  # num_layers,magnitude; train images only.
    return c
