"""`tix.load`: a diffusers-layout Stable Diffusion folder or Hub id -> `StableDiffusion`, without importing torch.

Weights are read with a memory-mapped safetensors reader and converted to Flax layout by `tix.weights`. Only `.bin`
checkpoints need torch, and only when the user has it installed (read with `weights_only=True`, never a plain
unpickler).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tix import hub, weights
from tix.errors import CheckpointError, ConfigError
from tix.models import clip
from tix.models.shapes import param_shapes
from tix.models.unet import UNet2DConditionModel, UNetConfig
from tix.models.vae import AutoencoderKL, VAEConfig, rename_legacy_vae_keys
from tix.pipeline import StableDiffusion, TextSide
from tix.schedule import NoiseSchedule
from tix.tokenizer import load_tokenizer

DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
          "float16": jnp.float16, "fp16": jnp.float16}
SUPPORTED_CLASSES = {
    "unet": {"UNet2DConditionModel"},
    "vae": {"AutoencoderKL"},
    "text_encoder": {"CLIPTextModel", "CLIPTextModelWithProjection"},
    "text_encoder_2": {"CLIPTextModel", "CLIPTextModelWithProjection"},
    "tokenizer": {"CLIPTokenizer", "CLIPTokenizerFast"},
    "tokenizer_2": {"CLIPTokenizer", "CLIPTokenizerFast"},
}
SUPPORTED_PIPELINES = {"StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusionImg2ImgPipeline",
                       "StableDiffusionXLImg2ImgPipeline"}
WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model"}
# Files a Hub download needs beyond the weights.
HUB_CONFIG_PATTERNS = ["model_index.json", "*/config.json", "scheduler/*.json", "tokenizer/*", "tokenizer_2/*"]


def _dtype(name: Any) -> Any:
    if name is None or not isinstance(name, str):
        return name
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not supported; use one of float32, bfloat16, float16")
    return DTYPES[name]


def load(
    path: str | os.PathLike,
    dtype: str = "float32",
    *,
    compute_dtype: str | None = None,
    variant: str | None = None,
) -> StableDiffusion:
    """Load a Stable Diffusion 1.x / 2.x / XL checkpoint in diffusers layout.

    `path` is a local folder, a Hub id (downloaded through huggingface_hub, only the files needed), or "toyworld"
    (the small model tix ships). `dtype` is how the weights are kept; `compute_dtype` (default: `dtype`) is what the
    models compute in. `variant="fp16"` prefers `*.fp16.safetensors` files (chosen by default for half dtypes).
    """
    param_dtype = _dtype(dtype)
    compute = _dtype(compute_dtype) or param_dtype
    if variant is None and param_dtype in (jnp.float16, jnp.bfloat16):
        variant = "fp16"
    folder = resolve(path, variant)
    index = _read_json(folder / "model_index.json") if (folder / "model_index.json").exists() else {}
    if index and index.get("_class_name") not in SUPPORTED_PIPELINES:
        raise CheckpointError(
            f"{folder}: model_index.json names pipeline {index.get('_class_name')!r}; tix loads Stable Diffusion "
            "1.x/2.x/XL "
            f"({', '.join(sorted(SUPPORTED_PIPELINES))})"
        )
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (folder / component).is_dir():
            raise CheckpointError(
                f"{folder}: the {component}/ folder is missing; a diffusers Stable Diffusion checkpoint has "
                "unet/, vae/, text_encoder/, tokenizer/ and scheduler/ (SDXL also text_encoder_2/, tokenizer_2/)"
            )
    for component, (_, cls) in ((k, v) for k, v in index.items() if isinstance(v, list) and len(v) == 2):
        if cls is not None and component in SUPPORTED_CLASSES and cls not in SUPPORTED_CLASSES[component]:
            raise CheckpointError(
                f"{folder}: component {component!r} is a {cls}, which tix does not implement "
                f"(supported: {', '.join(sorted(SUPPORTED_CLASSES[component]))})"
            )

    unet_raw = _component_config(folder, "unet")
    unet_cfg = UNetConfig.from_diffusers(unet_raw)
    vae_cfg = VAEConfig.from_diffusers(_component_config(folder, "vae"))
    unet = UNet2DConditionModel(unet_cfg, dtype=compute)
    vae = AutoencoderKL(vae_cfg, dtype=compute)
    params: dict[str, Any] = {
        "unet": _load_params(folder, "unet", unet, param_dtype, variant=variant),
        "vae": _load_params(folder, "vae", vae, param_dtype, variant=variant, rename=rename_legacy_vae_keys),
    }
    sides = []
    names = ["text_encoder"] + (["text_encoder_2"] if (folder / "text_encoder_2").is_dir() else [])
    for name in names:
        cfg = clip.CLIPTextConfig.from_diffusers(_component_config(folder, name))
        model = clip.CLIPTextModel(cfg, dtype=compute)
        params[name] = _load_params(folder, name, model, param_dtype, variant=variant, rename=clip.normalize_torch_keys,
                                    ignore=clip.TORCH_IGNORE)
        tok_dir = folder / ("tokenizer_2" if name == "text_encoder_2" else "tokenizer")
        if not tok_dir.is_dir():
            raise CheckpointError(f"{folder}: {name}/ has no matching {tok_dir.name}/ folder")
        sides.append(TextSide(name=name, model=model, tokenizer=load_tokenizer(tok_dir)))

    kind = _kind(unet_cfg, sides)
    sched_path = folder / "scheduler" / "scheduler_config.json"
    if not sched_path.exists():
        raise CheckpointError(f"{folder}: scheduler/scheduler_config.json is missing")
    scheduler_config = _read_json(sched_path)
    context_width = sum(s.width for s in sides)
    if context_width != unet_cfg.cross_attention_dim:
        raise CheckpointError(
            f"{folder}: the text encoders give {context_width}-wide context but the UNet's cross_attention_dim is "
            f"{unet_cfg.cross_attention_dim}; the components come from different models"
        )
    return StableDiffusion(
        kind=kind,
        unet=unet,
        vae=vae,
        text=tuple(sides),
        params=params,
        schedule=NoiseSchedule.from_diffusers(scheduler_config),
        scheduler_config=scheduler_config,
        default_size=_default_size(unet_raw, vae_cfg),
        source=str(path),
    )


def _default_size(unet_raw: dict[str, Any], vae_cfg: VAEConfig) -> int:
    sample = unet_raw.get("sample_size") or 64
    sample = sample[0] if isinstance(sample, list | tuple) else sample
    return int(sample) * 2 ** (len(vae_cfg.block_out_channels) - 1)


def _kind(unet_cfg: UNetConfig, sides: list[TextSide]) -> str:
    if len(sides) == 2:
        return "sdxl"
    # SD 2.x is the OpenCLIP text tower (gelu) with linear projections in the UNet.
    return "sd2" if sides[0].model.config.hidden_act == "gelu" or unet_cfg.use_linear_projection else "sd1"


def resolve(path: str | os.PathLike, variant: str | None = None) -> Path:
    """A local folder for `path`: itself, the bundled toy-world model, or a Hub snapshot."""
    if str(path) == "toyworld":
        from tix.toyworld import model_dir

        return model_dir()
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(f"{local} is a file; tix.load wants a diffusers folder (model_index.json, unet/...)")
        return local
    if not hub.is_hub_id(path):
        raise CheckpointError(f"{path}: no such folder, and it is not a Hub id of the form 'owner/name'")
    return _hub_snapshot(str(path), variant)


def _hub_snapshot(repo_id: str, variant: str | None) -> Path:
    """Download (or find in the cache, offline too) only the configs, tokenizers and one weights file per component."""
    import huggingface_hub as hub

    # A submodule: `hub.constants` is not an attribute of the lazily-imported package until it is imported.
    from huggingface_hub import constants as hub_constants

    files = None
    if not hub_constants.HF_HUB_OFFLINE:
        try:
            files = hub.list_repo_files(repo_id)
        except Exception:  # unreachable: fall back to whatever the cache holds
            files = None
    patterns = list(HUB_CONFIG_PATTERNS)
    if files is None:
        # Component folders only: a bare "*.safetensors" would also match single-file checkpoints at the repo root.
        patterns += [f"{c}/*.safetensors*" for c in WEIGHT_NAMES]
    else:
        for component, base in WEIGHT_NAMES.items():
            names = {f.split("/", 1)[1] for f in files if f.startswith(component + "/")}
            chosen = _choose_weights(names, base, variant)
            patterns += [f"{component}/{name}" for name in chosen]
    try:
        return Path(hub.snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:
        raise CheckpointError(
            f"could not get {repo_id!r} from the Hugging Face Hub ({type(err).__name__}: {err}); check the id, your "
            "network and HF_TOKEN for gated models, or pass a local diffusers folder"
        ) from err


def _choose_weights(names: set[str], base: str, variant: str | None) -> list[str]:
    """The weight files to read for one component: the asked variant first (one file or shards), then the full
    weights, then fp16 as a last resort; safetensors before any .bin. One variant only, never both."""
    preference = list(dict.fromkeys([variant, None, "fp16"]))
    for v in preference:
        single = f"{base}.{v}.safetensors" if v else f"{base}.safetensors"
        if single in names:
            return [single]
        # diffusers and transformers name a variant's index `<base>.safetensors.index.<variant>.json` and its shards
        # `<base>.<variant>-00001-of-0000N.safetensors`; the other spelling of the index is accepted too.
        stem = f"{base}.{v}" if v else base
        indexes = [f"{base}.safetensors.index.{v}.json", f"{stem}.safetensors.index.json"] if v else [
            f"{base}.safetensors.index.json"]
        for index in indexes:
            if index in names:
                return [index] + sorted(n for n in names if n.startswith(stem + "-") and n.endswith(".safetensors"))
    bin_base = _bin_base(base)
    for v in preference:
        name = f"{bin_base}.{v}.bin" if v else f"{bin_base}.bin"
        if name in names:
            return [name]
    return []


def _bin_base(base: str) -> str:
    # transformers names its pickles pytorch_model.bin but its safetensors model.safetensors; diffusers uses one stem.
    return "pytorch_model" if base == "model" else base


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from err


def _component_config(folder: Path, component: str) -> dict[str, Any]:
    path = folder / component / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder / component}: config.json is missing")
    cfg = _read_json(path)
    cls = cfg.get("_class_name") or (cfg.get("architectures") or [None])[0]
    if cls is not None and cls not in SUPPORTED_CLASSES[component]:
        raise CheckpointError(
            f"{path}: {component} is a {cls}, which tix does not implement "
            f"(supported: {', '.join(sorted(SUPPORTED_CLASSES[component]))})"
        )
    return cfg


def read_state_dict(folder: Path, base: str, variant: str | None = None) -> dict[str, np.ndarray]:
    """The PyTorch-layout tensors of one component folder, as numpy."""
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    chosen = _choose_weights(names, base, variant)
    if not chosen:
        raise CheckpointError(
            f"{folder}: no weights found (looked for {base}.safetensors, {base}.fp16.safetensors, sharded "
            f"{base}.safetensors.index.json and {_bin_base(base)}.bin)"
        )
    first = folder / chosen[0]
    if first.suffix == ".json":  # a shard index, `.safetensors.index.json` or a variant's `.index.fp16.json`
        weight_map = _read_json(first).get("weight_map", {})
        state: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).exists():
                raise CheckpointError(f"{folder}: shard {shard} named by {first.name} is missing")
            state.update(weights.read_safetensors(folder / shard))
        return state
    if first.suffix == ".safetensors":
        return weights.read_safetensors(first)
    return _read_torch_bin(first)


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path} is a PyTorch pickle and torch is not installed. Either `pip install torch` (tix then reads "
            "it with torch.load(weights_only=True)), or convert it once to safetensors, e.g. with diffusers: "
            "`DiffusionPipeline.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: refused or unreadable PyTorch pickle ({err})") from err
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}


def _load_params(
    folder: Path, component: str, module: Any, dtype: Any, *, variant: str | None = None, rename=None, ignore=()
) -> dict[str, Any]:
    state = read_state_dict(folder / component, WEIGHT_NAMES[component], variant)
    if rename is not None:
        state = rename(state)
    abstract = param_shapes(module)
    try:
        params = weights.from_torch(state, abstract, dtype=dtype, component=f"{folder.name}/{component}", ignore=ignore)
    except weights.WeightsError as err:
        raise CheckpointError(str(err)) from None
    # Peak memory: the file's mapped pages and the converted numpy tree already hold two copies of the weights, and
    # jnp.asarray copies every transposed (non-contiguous) kernel once more. Unmap the file first, then convert one
    # leaf at a time so each numpy original is freed as its device copy appears.
    del state
    leaves, treedef = jax.tree.flatten(params)
    del params
    for i, leaf in enumerate(leaves):
        leaves[i] = jnp.asarray(leaf)
    return jax.tree.unflatten(treedef, leaves)
