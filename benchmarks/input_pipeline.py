"""Images per second of the streaming loader at 224 px (decode, Inception crop, flip),
then the supernet iteration's dispatches and host syncs (benchmarks/supernet_syncs.py).

Reads batches of synthetic ImageNet-shaped JPEGs (224-500 px,
benchmarks/synthetic_imagenet.py) from a TFDS ArrayRecord set, in order, as a
training stage does, with the decode and crop in threads of the main process
(``data.workers=0``) and in worker processes. The first batches (worker start,
first reads) are not timed. Also evaluation batches (resize + centre crop).

  python benchmarks/input_pipeline.py [--images 768] [--batch 64] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grain  # noqa: E402

from autospace_jax.data import input_pipeline  # noqa: E402
from benchmarks import _report, supernet_syncs, synthetic_imagenet  # noqa: E402
from configs import default  # noqa: E402

WARMUP_BATCHES = 2


def images_per_second(data_dir: str, workers: int, batch: int, split: str) -> float:
    c = default.get_config().data
    c.source, c.data_dir, c.image_size, c.workers = (
        "tfds:synthetic_imagenet",
        data_dir,
        224,
        workers,
    )
    ds = input_pipeline.load(c, seed=0, process_index=0, process_count=1)
    if split == "test":
        plan = ds._plan("test", batch, 0)
        batches = ds._loader(
            grain.MapDataset.range(len(plan.indices) // batch).map(plan.eval_batch)
        )
        read = lambda step: next(batches)  # noqa: E731
    else:
        read = lambda step: ds.local_train_batch(step, batch, seed=0)  # noqa: E731
    steps = ds.steps_per_epoch(batch, "train" if split == "train" else "test")
    for step in range(WARMUP_BATCHES):
        read(step)
    start = time.perf_counter()
    for step in range(WARMUP_BATCHES, steps):
        read(step)
    return (steps - WARMUP_BATCHES) * batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=768)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="input_pipeline_")
    rows = []
    try:
        synthetic_imagenet.build(tmp, train=a.images, validation=a.images)
        for split in ("train", "test"):
            for workers in (0, 1, 2):
                rate = images_per_second(tmp, workers, a.batch, split)
                rows.append([split, workers or "0 (2 threads)", f"{rate:.0f}"])
                print(_report.table(HEADER, rows[-1:]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not a.no_write:
        body = (
            f"{a.images} synthetic JPEGs of 224-500 px per side (about ImageNet's), batches of "
            f"{a.batch} at 224 px, read in order after {WARMUP_BATCHES} untimed batches. train: "
            "decode + Inception crop + flip flag; test: decode + resize + centre crop.\n\n"
            + _report.table(HEADER, rows)
        )
        _report.write_section("Input pipeline (streaming, 224 px)",
                              "python benchmarks/input_pipeline.py", body)  # fmt: skip
    print(supernet_syncs.report(write=not a.no_write))


HEADER = ["split", "worker processes", "images/s"]

if __name__ == "__main__":
    main()
