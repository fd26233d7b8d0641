"""``--mode=latency``: the latency table of ``search.space`` on this device, checked."""

from __future__ import annotations

from typing import Any

from absl import logging
from etils import epath

from autospace_jax.data import input_pipeline
from autospace_jax.latency.table import check, device_kind, measure, table_path
from autospace_jax.runtime import files
from autospace_jax.space import arch as arch_lib
from autospace_jax.space import genome as genome_lib
from autospace_jax.space import spaces


def run(config: Any, workdir: str) -> dict[str, Any]:
    """``--mode=latency``: measures the table of ``search.space`` and checks it."""
    dataset = input_pipeline.load(config.data, seed=config.seed, cache_dir=workdir)
    info = dataset.info
    skeleton = arch_lib.skeleton_from_config(config.model, info.num_classes)
    arch_lib.check_image_size(skeleton, info.image_shape)
    space, source = spaces.resolve(config.search.space, workdir, skeleton)
    lc = config.latency
    logging.info(
        "latency: timing the %d candidate cells of %s (%s) on %s at batch sizes %s",
        sum(len(c) for c in space.candidates), config.search.space, source, device_kind(),
        list(lc.batch_sizes),
    )  # fmt: skip
    table = measure(space, info.image_shape, lc, genome_lib.reference(config.genome.reference))
    if lc.check_paths:
        table["check"] = check(space, info.image_shape, table, lc, config.seed)
        logging.info(
            "latency: %d random networks, predicted vs measured: mean error %s, max %s "
            "(by batch size)", lc.check_paths,
            {b: f"{100 * e:.1f}%" for b, e in table["check"]["mean_abs_error"].items()},
            {b: f"{100 * e:.1f}%" for b, e in table["check"]["max_abs_error"].items()},
        )  # fmt: skip
    path = table_path(config, workdir)
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    files.write_summary(path, table)
    logging.info("latency: wrote %s", path)
    return table
