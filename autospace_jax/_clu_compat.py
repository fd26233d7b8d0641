"""Lets ``clu.metric_writers`` import without TensorFlow.

clu imports its TensorFlow summary writer at package import time, and TensorFlow
is an optional extra here (1.4 GB, not needed for digits, npz, TFDS ArrayRecord
or the tests). When TensorFlow is absent, a placeholder for that one submodule
is registered before clu is imported; TensorBoard files are written by
``writers.TensorboardXWriter`` instead. Imported first by ``autospace_jax/__init__``.
"""

import importlib.util
import sys
import types
from typing import Any

if importlib.util.find_spec("tensorflow") is None and (
    "clu.metric_writers.summary_writer" not in sys.modules
):
    _placeholder = types.ModuleType("clu.metric_writers.summary_writer")

    class _NoTensorFlowSummaryWriter:
        def __init__(self, *args: Any, **kwargs: Any):
            raise ImportError(
                "clu's SummaryWriter needs TensorFlow; autospace_jax writes TensorBoard "
                "files with writers.TensorboardXWriter instead"
            )

    _placeholder.SummaryWriter = _NoTensorFlowSummaryWriter
    sys.modules[_placeholder.__name__] = _placeholder
