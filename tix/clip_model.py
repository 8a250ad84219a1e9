"""`tix.load_clip`: a transformers CLIPModel folder or Hub id -> `CLIP`, torch-free, for scoring images and texts.

`CLIP.encode_images` is transformers' `CLIPImageProcessor` (resize the shortest side with PIL, centre crop, rescale,
normalise; the folder's preprocessor_config.json decides the numbers) followed by `get_image_features`;
`CLIP.encode_texts` is the tokenizer followed by `get_text_features`. Both return the raw projected features; the
similarities in `tix.metrics` normalise them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tix import weights
from tix.errors import CheckpointError, ConfigError
from tix.models.clip_vision import TORCH_IGNORE, CLIPConfig, CLIPModel, abstract_params

# OpenAI CLIP's pixel statistics (what every openai/clip-vit-* preprocessor_config.json holds).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PIL_BICUBIC = 3
# Files of a CLIPModel repository tix reads, besides the weights.
HUB_PATTERNS = ["config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json", "vocab.json",
                "merges.txt", "special_tokens_map.json"]


@dataclasses.dataclass(frozen=True)
class ImagePreprocess:
    """CLIPImageProcessor's settings: resize so the shortest side is `shortest_edge` (or to exactly `resize_to`),
    centre crop to `crop`, multiply by `rescale_factor`, normalise by `mean` and `std`."""

    shortest_edge: int | None = 224
    resize_to: tuple[int, int] | None = None  # (height, width), when the config asks for a fixed size
    crop: tuple[int, int] | None = (224, 224)
    resample: int = _PIL_BICUBIC
    rescale_factor: float | None = 1 / 255
    mean: tuple[float, ...] | None = CLIP_MEAN
    std: tuple[float, ...] | None = CLIP_STD

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ImagePreprocess:
        """Read a preprocessor_config.json dict (both the old int and the new dict spelling of sizes)."""
        size, crop = cfg.get("size", 224), cfg.get("crop_size", 224)
        shortest, resize_to = None, None
        if cfg.get("do_resize", True):
            if isinstance(size, int):
                shortest = size
            elif "shortest_edge" in size:
                shortest = int(size["shortest_edge"])
            elif "height" in size and "width" in size:
                resize_to = (int(size["height"]), int(size["width"]))
            else:
                raise ConfigError(f"preprocessor_config.json: size={size!r} is not supported; expected an int, "
                                  "{'shortest_edge': N} or {'height': H, 'width': W}")
        crop_hw = None
        if cfg.get("do_center_crop", True):
            crop_hw = (crop, crop) if isinstance(crop, int) else (int(crop["height"]), int(crop["width"]))
        normalize = cfg.get("do_normalize", True)
        return cls(shortest, resize_to, crop_hw, int(cfg.get("resample", _PIL_BICUBIC)),
                   cfg.get("rescale_factor", 1 / 255) if cfg.get("do_rescale", True) else None,
                   tuple(cfg.get("image_mean", CLIP_MEAN)) if normalize else None,
                   tuple(cfg.get("image_std", CLIP_STD)) if normalize else None)


def resized_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) with the shorter side `shortest_edge` and the longer scaled and truncated, as transformers'
    get_resize_output_image_size computes it."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centre `height` x `width` of an HWC image, zero-padded first where it is smaller (transformers' rule)."""
    h, w = image.shape[:2]
    if h < height or w < width:
        padded = np.zeros((max(h, height), max(w, width), *image.shape[2:]), image.dtype)
        top, left = -(-(padded.shape[0] - h) // 2), -(-(padded.shape[1] - w) // 2)
        padded[top:top + h, left:left + w] = image
        image, h, w = padded, *padded.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    return image[top:top + height, left:left + width]


def preprocess(images: np.ndarray | Sequence[np.ndarray], spec: ImagePreprocess) -> np.ndarray:
    """uint8 RGB images (an NHWC batch, or HWC images of any sizes) -> float32 NHWC pixels for the vision tower."""
    from PIL import Image

    out = []
    for image in images:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ConfigError(f"CLIP encodes uint8 RGB images [H, W, 3]; got {image.dtype} {image.shape}")
        if spec.shortest_edge or spec.resize_to:
            size = spec.resize_to or resized_size(*image.shape[:2], spec.shortest_edge)
            image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), resample=spec.resample))
        if spec.crop:
            image = center_crop(image, *spec.crop)
        pixels = image.astype(np.float32)
        if spec.rescale_factor is not None:  # in float64 then down, as transformers rescales
            pixels = (image.astype(np.float64) * spec.rescale_factor).astype(np.float32)
        if spec.mean is not None:
            pixels = (pixels - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
        out.append(pixels)
    return np.stack(out) if out else np.zeros((0, *(spec.crop or (0, 0)), 3), np.float32)


@dataclasses.dataclass
class CLIP:
    """A frozen CLIPModel loaded by `tix.load_clip`."""

    model: CLIPModel
    params: dict[str, Any]
    tokenizer: Any
    image_spec: ImagePreprocess
    source: str = ""

    @property
    def dim(self) -> int:
        return self.model.config.projection_dim

    def image_features_fn(self, params: dict[str, Any], pixels: jax.Array) -> jax.Array:
        return self.model.apply({"params": params}, pixels, method=CLIPModel.image_features)

    def text_features_fn(self, params: dict[str, Any], ids: jax.Array) -> jax.Array:
        return self.model.apply({"params": params}, ids, self.tokenizer.eos_token_id, method=CLIPModel.text_features)

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        length = min(self.tokenizer.model_max_length, self.model.config.text.max_position_embeddings)
        ids = self.tokenizer(list(texts), padding="max_length", max_length=length, truncation=True).input_ids
        return np.asarray(ids, np.int32)

    def encode_images(self, images: np.ndarray | Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """get_image_features of uint8 RGB images (NHWC, or a list of HWC of any sizes) -> float32 [N, dim]."""
        pixels = preprocess(images, self.image_spec)
        return _batched(partial(_jit_image(self), self.params), pixels, batch_size, self.dim)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """get_text_features of `texts` -> float32 [N, dim]."""
        return _batched(partial(_jit_text(self), self.params), self.tokenize(texts), batch_size, self.dim)


def _batched(fn, inputs: np.ndarray, batch_size: int, dim: int) -> np.ndarray:
    """`fn` over fixed-size chunks (the last padded), so one compiled shape serves any count."""
    n = len(inputs)
    if n == 0:
        return np.zeros((0, dim), np.float32)
    size = min(batch_size, n)
    out = []
    for i in range(0, n, size):
        chunk = inputs[i:i + size]
        pad = size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        out.append(np.asarray(fn(jnp.asarray(chunk)), np.float32)[:size - pad])
    return np.concatenate(out)


_JIT: dict[tuple[int, str], Any] = {}


def _jit_image(clip_model: CLIP):
    return _JIT.setdefault((id(clip_model), "image"), jax.jit(clip_model.image_features_fn))


def _jit_text(clip_model: CLIP):
    return _JIT.setdefault((id(clip_model), "text"), jax.jit(clip_model.text_features_fn))


def load_clip(path: str | os.PathLike, dtype: str = "float32") -> CLIP:
    """Load a transformers CLIPModel (e.g. openai/clip-vit-base-patch32 or clip-vit-large-patch14) from a local
    folder or a Hub id, without torch (safetensors; a .bin is read through torch only if it is installed)."""
    from tix.loading import _dtype, read_state_dict
    from tix.tokenizer import load_tokenizer

    param_dtype = _dtype(dtype)
    folder = _resolve(path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: config.json is missing; tix.load_clip reads a transformers CLIPModel folder "
                              "(config.json, model.safetensors, tokenizer files, preprocessor_config.json)")
    config = CLIPConfig.from_transformers(_read_json(config_path))
    state = read_state_dict(folder, "model")
    try:
        params = weights.from_torch(state, abstract_params(config), dtype=param_dtype, component=f"{folder.name}",
                                    ignore=TORCH_IGNORE)
    except weights.WeightsError as err:
        raise CheckpointError(str(err)) from None
    del state
    pre = folder / "preprocessor_config.json"
    spec = ImagePreprocess.from_config(_read_json(pre)) if pre.is_file() else ImagePreprocess(
        config.vision.image_size, None, (config.vision.image_size,) * 2)
    if spec.crop and spec.crop != (config.vision.image_size,) * 2:
        raise CheckpointError(f"{folder}: preprocessor_config.json crops to {spec.crop} but the vision tower takes "
                              f"{config.vision.image_size} px images")
    return CLIP(CLIPModel(config, dtype=param_dtype), jax.tree.map(jnp.asarray, params), load_tokenizer(folder), spec,
                str(path))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from err


def _resolve(path: str | os.PathLike) -> Path:
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise CheckpointError(f"{local} is a file; tix.load_clip wants a CLIPModel folder or a Hub id")
    if str(path).count("/") != 1 or str(path).startswith((".", "/", "~")):
        raise CheckpointError(f"{path}: no such folder, and it is not a Hub id of the form 'owner/name' "
                              "(e.g. openai/clip-vit-base-patch32)")
    import huggingface_hub as hub
    from huggingface_hub import constants as hub_constants

    from tix.loading import _choose_weights

    patterns = HUB_PATTERNS + ["model.safetensors*", "model-*.safetensors"]
    if not hub_constants.HF_HUB_OFFLINE:
        with contextlib.suppress(Exception):  # unreachable: fall back to whatever the cache holds
            patterns = HUB_PATTERNS + _choose_weights(set(hub.list_repo_files(str(path))), "model", None)
    try:
        return Path(hub.snapshot_download(str(path), allow_patterns=patterns))
    except Exception as err:
        raise CheckpointError(f"could not get {path!r} from the Hugging Face Hub ({type(err).__name__}: {err}); "
                              "check the id and your network, or pass a local CLIPModel folder") from err
