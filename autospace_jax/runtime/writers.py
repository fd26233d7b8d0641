"""clu metric writers without TensorFlow: TensorBoard event files via tensorboardX.

Implements clu's documented extension point, :class:`clu.metric_writers.MetricWriter`,
over tensorboardX. clu imports its TensorFlow summary writer at package import time,
and TensorFlow is an optional extra here (1.4 GB, not needed for digits, npz, TFDS
ArrayRecord or the tests): when TensorFlow is absent, a placeholder for that one
submodule is registered before clu is imported. Everything else of clu
(LoggingWriter, AsyncMultiWriter) is used as is.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tensorboardX
from absl import logging


def _register_placeholder_summary_writer() -> None:
    """clu.metric_writers.summary_writer without TensorFlow: refuses to be built."""
    name = "clu.metric_writers.summary_writer"
    if importlib.util.find_spec("tensorflow") is not None or name in sys.modules:
        return
    placeholder = types.ModuleType(name)

    class SummaryWriter:
        def __init__(self, *args: Any, **kwargs: Any):
            raise ImportError(
                "clu's SummaryWriter needs TensorFlow; autospace_jax writes TensorBoard "
                "files with writers.TensorboardXWriter instead"
            )

    placeholder.SummaryWriter = SummaryWriter
    sys.modules[name] = placeholder


_register_placeholder_summary_writer()
from clu import metric_writers  # noqa: E402  (after the placeholder)


class TensorboardXWriter(metric_writers.MetricWriter):
    """clu MetricWriter that writes TensorBoard event files with tensorboardX."""

    def __init__(self, logdir: str):
        super().__init__()
        self._writer = tensorboardX.SummaryWriter(logdir=logdir)

    def write_summaries(self, step, values, metadata=None):
        for key, value in values.items():
            self._writer.add_scalar(key, float(np.asarray(value).mean()), global_step=step)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        for key, value in scalars.items():
            self._writer.add_scalar(key, float(value), global_step=step)

    def write_images(self, step: int, images: Mapping[str, Any]):
        for key, value in images.items():
            value = np.asarray(value)
            if value.ndim == 4:
                self._writer.add_images(key, value, global_step=step, dataformats="NHWC")
            else:
                self._writer.add_image(key, value, global_step=step, dataformats="HWC")

    def write_videos(self, step: int, videos: Mapping[str, Any]):
        logging.log_first_n(logging.WARNING, "TensorboardXWriter does not write videos.", 1)

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
        for key, value in audios.items():
            self._writer.add_audio(key, value, global_step=step, sample_rate=sample_rate)

    def write_texts(self, step: int, texts: Mapping[str, str]):
        for key, value in texts.items():
            self._writer.add_text(key, value, global_step=step)

    def write_histograms(self, step, arrays, num_buckets=None):
        for key, value in arrays.items():
            self._writer.add_histogram(key, np.asarray(value), global_step=step)

    def write_hparams(self, hparams: Mapping[str, Any]):
        self._writer.add_text("hparams", repr(dict(hparams)))

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


def create_writer(logdir: str) -> metric_writers.MetricWriter:
    """Logging + TensorBoard writer on process 0; logging only elsewhere."""
    writers: list[metric_writers.MetricWriter] = [metric_writers.LoggingWriter()]
    if jax.process_index() == 0:
        writers.append(TensorboardXWriter(logdir))
    return metric_writers.AsyncMultiWriter(writers)
