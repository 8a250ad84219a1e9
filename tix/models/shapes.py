"""A model's parameter tree as shapes and dtypes, without allocating it: what a checkpoint is checked against."""

from __future__ import annotations

import logging
import pickle
from typing import Any

import jax
import numpy as np

from tix import disk_cache

log = logging.getLogger(__name__)


def param_shapes(module: Any) -> Any:
    """`jax.eval_shape(module.init_params, key)`: ShapeDtypeStructs of the module's parameters.

    Tracing a UNet's init takes seconds of Python on every load, yet its result depends only on the module's
    attributes (its repr) and tix's code, so it is kept in the disk cache."""
    name = disk_cache.key("params", repr(module))
    data = disk_cache.read(name)
    if data is not None:
        try:
            leaves, tree = pickle.loads(data)
            return jax.tree.unflatten(tree, [jax.ShapeDtypeStruct(s, np.dtype(d)) for s, d in leaves])
        except Exception as err:  # damaged, or from another runtime: trace again and replace it
            log.debug("parameter shapes %s not usable: %s", name, err)
    abstract = jax.eval_shape(module.init_params, jax.random.key(0))
    leaves, tree = jax.tree.flatten(abstract)
    disk_cache.write(name, pickle.dumps(([(tuple(x.shape), np.dtype(x.dtype).str) for x in leaves], tree)))
    return abstract
