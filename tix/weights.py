"""Moving weights between PyTorch's layout (diffusers/transformers state dicts) and tix's Flax parameter trees.

tix's Linen modules are named after the attributes of the PyTorch modules they mirror, with list members written
``name_<i>`` (``down_blocks_0``). So a Flax parameter path determines its PyTorch key and the conversion is one
mechanism for every model: no per-model rename tables to drift out of date.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

# PyTorch attributes that are ModuleLists/Sequentials: their members are `name.<i>` in the state dict.
LIST_ATTRIBUTES = frozenset(
    {
        "down_blocks",
        "up_blocks",
        "resnets",
        "attentions",
        "transformer_blocks",
        "downsamplers",
        "upsamplers",
        "layers",
        "to_out",
        "net",
    }
)

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class WeightsError(ValueError):
    """A checkpoint's tensors do not fit the model its config describes."""


def torch_key(path: tuple[str, ...]) -> str:
    """The PyTorch state-dict key of the Flax parameter at `path`."""
    parts: list[str] = []
    for segment in path[:-1]:
        match = re.fullmatch(r"(.+)_(\d+)", segment)
        if match and match.group(1) in LIST_ATTRIBUTES:
            parts.extend(match.groups())
        else:
            parts.append(segment)
    parts.append(_LEAF_TO_TORCH.get(path[-1], path[-1]))
    return ".".join(parts)


def _to_flax_layout(leaf: str, array: np.ndarray, want_ndim: int) -> np.ndarray:
    if leaf == "kernel":
        if array.ndim == 4 and want_ndim == 4:  # conv [out, in, kh, kw] -> [kh, kw, in, out]
            return array.transpose(2, 3, 1, 0)
        if array.ndim == 4 and want_ndim == 2 and array.shape[2:] == (1, 1):  # 1x1 conv stored for a Linear
            return array[:, :, 0, 0].T
        if array.ndim == 2:  # linear [out, in] -> [in, out]
            return array.T
    return array


def _to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        if array.ndim == 4:
            return array.transpose(3, 2, 0, 1)
        if array.ndim == 2:
            return array.T
    return array


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat: dict[tuple[str, ...], Any] = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, (*prefix, name)))
        else:
            flat[(*prefix, name)] = value
    return flat


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def expected_torch_keys(abstract_params: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """PyTorch key -> PyTorch shape for every parameter of a Flax tree (arrays or ShapeDtypeStructs)."""
    out = {}
    for path, leaf in _flatten(abstract_params).items():
        shape = tuple(leaf.shape)
        if path[-1] == "kernel" and len(shape) == 4:
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif path[-1] == "kernel" and len(shape) == 2:
            shape = (shape[1], shape[0])
        out[torch_key(path)] = shape
    return out


def from_torch(
    state_dict: Mapping[str, np.ndarray],
    abstract_params: Mapping[str, Any],
    *,
    dtype: Any = np.float32,
    component: str = "model",
    ignore: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Build the Flax parameter tree shaped like `abstract_params` from a PyTorch-layout state dict.

    Strict both ways: every parameter must be found with the right shape and every tensor must be used, except keys
    matching an `ignore` regex (buffers such as CLIP's position_ids). Errors name the component, key and shapes.
    """
    remaining = {k: v for k, v in state_dict.items() if not any(re.fullmatch(p, k) for p in ignore)}
    flat = {}
    missing = []
    for path, leaf in _flatten(abstract_params).items():
        key = torch_key(path)
        if key not in remaining:
            missing.append(key)
            continue
        array = _to_flax_layout(path[-1], np.asarray(remaining.pop(key)), len(leaf.shape))
        if tuple(array.shape) != tuple(leaf.shape):
            raise WeightsError(
                f"{component}: tensor {key!r} has shape {tuple(array.shape)} (after layout change) but the config "
                f"implies {tuple(leaf.shape)}; the weights file does not belong to this config.json"
            )
        flat[path] = array.astype(dtype)
    if missing:
        raise WeightsError(
            f"{component}: {len(missing)} tensors the config needs are missing from the weights, e.g. {missing[:5]}; "
            "check that the weights file and config.json come from the same model"
        )
    if remaining:
        raise WeightsError(
            f"{component}: {len(remaining)} tensors in the weights are not used by the model built from config.json, "
            f"e.g. {sorted(remaining)[:5]}; the config describes a different architecture than the weights"
        )
    return _unflatten(flat)


def to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse of `from_torch`: a PyTorch-layout state dict (numpy) from a Flax tree."""
    return {torch_key(p): _to_torch_layout(p[-1], np.asarray(v)) for p, v in _flatten(params).items()}


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Read a .safetensors file into numpy arrays, memory-mapped, bfloat16 included.

    safetensors' own numpy loader cannot return bfloat16 (numpy has no such dtype); the format is a JSON header and
    raw little-endian buffers, so tix maps it directly and views bfloat16 through ml_dtypes."""
    path = Path(path)
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise WeightsError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which tix cannot read")
        start, end = info["data_offsets"]
        out[name] = data[start:end].view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out
