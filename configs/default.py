"""Default configuration: every field the library reads, with its meaning.

Hardware/dataset configs (digits.py, cifar10.py, imagenet_mobile.py) import
this and override fields. Override any field on the command line:

  python -m autospace_jax.main --config=configs/digits.py --workdir=runs/d \
      --config.train.epochs=5 --config.model.widths='(16, 32)'
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "train"  # Run when --mode is not given: pipeline | evolve | search | train.
    c.seed = 0
    # JAX's persistent compilation cache: '' = <workdir>/compilation_cache, 'off' = none.
    c.compilation_cache = ""
    # Seconds between progress lines (rate and ETA of finished work) of a long stage.
    c.progress_every_secs = 15.0
    # Run even when <workdir>/lease.json says another live run holds the folder (use only
    # when that run is gone: its lease is stale anyway once its heartbeat is 5 min old).
    c.takeover = False

    c.data = ml_collections.ConfigDict()
    c.data.source = "digits"  # digits | npz | tfds:<name>
    c.data.path = ""  # npz file for source=npz.
    c.data.data_dir = ""  # TFDS data_dir for tfds:<name> ('' = TFDS default).
    c.data.image_size = 0  # 0 = native; else resize to image_size x image_size at load.
    c.data.val_fraction = 0.1  # Held out of train: fitness/arch steps and validation.
    c.data.test_fraction = 0.2  # digits only (it has no official test split).
    # Train batches: random crop + flip at 32-127 px; Inception crop + flip from 128 px.
    c.data.augment = True
    # From image_size 128 on, images stream from their records: worker processes that
    # decode and crop (0 = threads of the main process).
    c.data.workers = 0
    c.data.rand_augment = ""  # RandAugment 'num_layers,magnitude', train images >= 128 px, '' off.

    # Macro skeleton: stage s has blocks[s] layers of width widths[s]; its first
    # layer has stride strides[s].
    c.model = ml_collections.ConfigDict()
    c.model.stem = 16
    c.model.stem_stride = 1
    c.model.widths = (16, 24, 32)
    c.model.blocks = (1, 2, 2)
    c.model.strides = (1, 2, 2)
    c.model.head = 128
    # Compute dtype of the supernet and the final network (parameters, optimizer state,
    # BatchNorm statistics and loss stay float32): auto (bfloat16 on GPU/TPU, float32 on
    # CPU) | float32 | bfloat16.
    c.model.dtype = "auto"

    c.genome = ml_collections.ConfigDict()
    c.genome.palette = "default"  # default (7 ops, + dwconv5x5/7x7) | paper (its 5 ops)
    c.genome.reference = "irb"  # The reference DAG (Eq. 2); trained when no arch is given.

    # Differentiable evolution of the space (paper §3.2). K is at least the manual
    # IRB space's 7 candidates, so the two spaces compete with as many cells per
    # layer (the paper: K = 9 against 7); the other values are this library's
    # CPU-sized choices. population.py says how the paper is read.
    c.evolution = ml_collections.ConfigDict()
    c.evolution.population_size = 12  # P individuals per layer.
    c.evolution.cells_per_layer = 7  # K: cells per layer in the supernet and in space.json.
    c.evolution.tournament_size = 2  # S.
    c.evolution.steps_per_generation = 25  # f: supernet iterations between rebuilds.
    c.evolution.generations = 8  # T.
    c.evolution.momentum = 0.5  # epsilon of Eq. 5.
    c.evolution.tau = 0.1  # Max Hamming distance (Eq. 2) to the reference, first half only.
    c.evolution.max_madds_factor = 4.0  # MAdds_max of a layer = factor x the reference's MAdds.
    # > 0: a child must also run faster than factor x the reference cell of its layer, each
    # timed on this device at search.latency_batch (latency.warmup, latency.repeats); 0: off.
    c.evolution.max_latency_factor = 0.0
    c.evolution.use_reference = True  # False: random initial population, no tau constraint.
    c.evolution.offspring = 2  # Children per layer per generation: the fittest winners breed.
    c.evolution.removal = "oldest"  # oldest (aging) | worst (lowest alpha).
    c.evolution.checkpoint_every = 1  # Generations between checkpoints.
    # How a fitness step measures dL/dg_k of Eq. 4: loss (the loss of the path through
    # cell k) | gradient (ProxylessNAS's <dL/dout, o_k>); BENCHMARKS "Fitness signal".
    c.evolution.fitness_estimate = "loss"
    c.evolution.fitness_batch_size = 128  # Validation batch of a fitness step.
    # After each generation the supernet is measured on this many validation batches
    # (of supernet.batch_size; the same batches every time), one uniformly drawn path
    # each: its loss and top-1 (summary supernet_val_loss / _top1, TensorBoard). A
    # fitness only ranks cells once this is well below chance. 0: not measured.
    c.evolution.val_batches = 4
    # Final rounds: the trained candidates train together until the top-K of every
    # layer stays the same for a round (at least 2 rounds, at most this many).
    c.evolution.final_rounds = 4
    # Compile ahead of time in threads: the first generation's cells, stem and head
    # while the data loads and the weights initialise, later cells in a background
    # thread while the previous generation trains (results are identical either way;
    # a child is picked from its second generation on in both cases).
    c.evolution.background_compile = True

    # NAS inside a space (paper §3.3): writes <workdir>/search/arch.json.
    c.search = ml_collections.ConfigDict()
    c.search.algorithm = "proxyless"  # proxyless | rl | spos
    c.search.space = "manual_irb"  # manual_irb | learned (<workdir>/evolve/space.json) | a path
    # What targets, Eq. 6's term, the RL reward and the SPOS limit count: madds, or
    # latency (ms, from the table --mode=latency measures on this kind of device).
    c.search.cost = "madds"
    # The target (0: none; proxyless then uses lambda * E[cost], rl and spos the reference
    # network's cost: the reference cell in every layer).
    c.search.target_madds = 0
    c.search.target_latency_ms = 0.0
    # A front from one search: one arch per target (in the cost's unit) as
    # search/arch_<target>.json, plus front.json and front.png; () = one target.
    c.search.targets = ()
    c.search.latency_table = ""  # '' = <workdir>/latency/table.json.
    c.search.latency_batch = 1  # Which of the table's batch sizes the search counts.
    c.search.tolerance = 0.1  # Chosen arch within target * (1 +- tolerance) (proxyless, rl).
    c.search.madds_lambda = 0.5  # lambda of Eq. 6.
    c.search.steps = 300  # Supernet iterations.
    c.search.warmup_steps = 100  # Weights only (uniform paths for rl) before arch updates.
    c.search.checkpoint_every_steps = 100
    c.search.bn_batches = 4  # BN recalibration batches before evaluating a path.
    c.search.rl_every = 2  # Controller update every n steps.
    c.search.rl_samples = 4  # Paths per controller update.
    c.search.rl_learning_rate = 0.05
    c.search.rl_baseline_decay = 0.9
    c.search.rl_madds_exponent = -0.5  # w of the MnasNet reward.
    c.search.spos_population = 12
    c.search.spos_iterations = 5
    c.search.spos_parents = 4

    # --mode=latency: every candidate cell of search.space timed on this device.
    c.latency = ml_collections.ConfigDict()
    c.latency.batch_sizes = (1, 64)  # 1 and a serving batch.
    c.latency.warmup = 3  # Untimed calls first.
    c.latency.repeats = 50  # The median of these.
    c.latency.check_paths = 10  # Random whole networks timed against the table's sum.

    # Weight-sharing supernet with binary gates (Eq. 3-4), used by evolve and search.
    c.supernet = ml_collections.ConfigDict()
    c.supernet.batch_size = 64  # Global, for both the weight and the fitness steps.
    c.supernet.learning_rate = 0.1  # Weights: SGD + momentum, cosine over the stage.
    c.supernet.momentum = 0.9
    c.supernet.nesterov = True
    c.supernet.weight_decay = 4e-5
    c.supernet.label_smoothing = 0.0
    c.supernet.fitness_learning_rate = 0.01  # Adam on alpha (ProxylessNAS: 1e-3 on ImageNet).
    c.supernet.fitness_b1 = 0.0  # Adam's b1 for alpha (ProxylessNAS: 0).
    c.supernet.fitness_init_std = 1e-3  # alpha ~ N(0, std): near-uniform p (paper Table 6).
    # Weight steps only (alpha fixed) before fitness steps. Its whole rounds of f steps
    # breed nothing and come before evolution.generations (DESIGN §4).
    c.supernet.warmup_epochs = 4
    # > 0: evolve's warm-up ends at the end of the first round after which the
    # supernet's validation loss (evolution.val_batches) has not improved on its best by
    # supernet.warmup_min_delta for this many rounds, and lasts warmup_epochs at most;
    # so fitness compares cells once the supernet has stopped learning fast, not how fast
    # each learns at the start. 0: the warm-up is warmup_epochs.
    c.supernet.warmup_patience = 0
    c.supernet.warmup_min_delta = 0.01
    c.supernet.compensation_clip = 10.0  # Max of n(d)/n'(d) in Eq. 4.
    # How a step runs: auto (= pieces, every platform: per-cell programs chained by the
    # host; one path's memory whatever K) | pieces | fused (one program per step: no
    # host reads inside it, memory grows with K). Same step, different gate draws.
    c.supernet.program = "auto"
    # XLA's exec_time_optimization_effort (-1..1; 0: XLA's default) for the cells'
    # programs, which evolve compiles anew for every child: lower compiles faster and
    # may run slower (BENCHMARKS "TPU compile: effort"). The final network is not affected.
    c.supernet.compile_effort = 0.0

    # Final training from scratch (paper §4.1).
    c.train = ml_collections.ConfigDict()
    c.train.arch = ""  # arch.json; '' = <workdir>/search/arch.json if present, else reference.
    c.train.batch_size = 64  # Global; a multiple of the device count.
    c.train.eval_batch_size = 256
    c.train.epochs = 30
    c.train.learning_rate = 0.1  # Peak, after linear warm-up; cosine decay to 0.
    c.train.warmup_epochs = 1
    c.train.momentum = 0.9
    c.train.nesterov = True
    c.train.weight_decay = 4e-5  # On conv and dense kernels only.
    c.train.label_smoothing = 0.1
    # Squeeze-and-excitation in every cell, C_se = max(1, int(C_in * se_ratio)), as
    # EfficientNet's 0.25 (paper Table 7); 0 = none.
    c.train.se_ratio = 0.0
    # Moving average of the weights for evaluation and export (EfficientNet: 0.9999;
    # the decay ramps up as (1 + step) / (10 + step)); 0 = none.
    c.train.ema_decay = 0.0
    c.train.log_every_steps = 50
    c.train.eval_every_epochs = 10
    c.train.checkpoint_every_steps = 200
    c.train.max_checkpoints = 2

    # --mode=compile: the run's programs compiled for a TPU slice, on any host (no TPU).
    c.compile = ml_collections.ConfigDict()
    # JAX's topology name ('v5e:4x4', 'v4:2x2x4') or a slice's ('v5litepod-16', 'v4-32').
    c.compile.topology = "v5e:2x2"
    return c
