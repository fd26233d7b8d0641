"""Image data sets as sharded global batches: the public interface is
:mod:`~autospace_jax.data.input_pipeline` (``load``); sources, augmentation and
streaming sit behind it.

Imports only :mod:`autospace_jax.runtime`.
"""
