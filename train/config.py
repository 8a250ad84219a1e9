"""The run configuration of `tix invert`: the defaults below, then a --config file (presets live in configs/), then
flags and `--set key=value` overrides. The resolved config is saved in the run folder and decides whether a
folder may be reused."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from tix.errors import ConfigError


@dataclasses.dataclass
class ConceptSpec:
    """One concept to learn. Fields left None take the run's defaults."""

    token: str
    images: str
    init: str | None = None
    vectors: int | None = None
    style: bool | None = None
    captions: list[str] | None = None  # prompt templates with "{}" for the token; None: the paper's templates


@dataclasses.dataclass
class TrainConfig:
    model: str = "toyworld"
    out: str = "runs/demo"
    # what to learn: one concept (images + token) or a folder of concept folders
    images: str | None = None
    token: str | None = None
    concepts: str | None = None
    init: str | None = None  # default: "sculpture" for objects, "painting" for styles (the paper's)
    vectors: int = 1
    style: bool = False
    init_from: str | None = None  # an embedding file (any format tix reads) whose vectors start the run
    prompts: list[str] | None = None  # training templates ("{}" = token) for every concept; None: the paper's
    validation_prompts: list[str] | None = None  # None: "a photo of {}" and two edits (style runs: style prompts)
    # optimisation
    steps: int = 3000
    batch_size: int = 4  # images per concept per step
    grad_accum: int = 1
    lr: float = 5e-4
    scale_lr: bool = True  # lr x batch_size x grad_accum, as the diffusers recipe
    lr_schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float | None = None  # per concept
    min_snr_gamma: float | None = None
    # the paper's variants (its Fig. 10), all off by default
    init_reg: float = 0.0  # >0: loss += init_reg x mean over a concept's vectors of ||v - v0||^2 (v0: initial value)
    progressive_every: int = 0  # >0: start with one vector, switch on one more every N steps up to `vectors`
    per_image_tokens: bool = False  # also learn one token per image, in some prompts "... {} with <token>_image<i>"
    per_image_mix: float = 0.25  # share of prompts that name the image's own token (the paper's code: 0.25)
    # data
    resolution: int | None = None  # default: the model's native size
    center_crop: bool = True  # False: `random_crops` random crops per image, encoded once
    random_crops: int = 8
    flip_p: float = 0.5
    # run
    seed: int = 0
    dtype: str = "float32"  # weights
    compute_dtype: str | None = None
    remat: bool = False
    concepts_per_step: int = 16  # more concepts than this run in waves reusing the compiled step
    save_every: int = 500
    keep_checkpoints: int = 3
    validate_every: int = 500  # 0: no validation images
    validation_steps: int = 25
    validation_guidance: float = 7.5
    validation_sampler: str = "dpm++2m"
    validation_seeds: int = 2
    log_every: int = 10
    fsdp: int = 1  # >1: split the frozen weights over this many devices (for models that do not fit one)
    # many hosts: explicit coordinator for clusters JAX cannot auto-detect (Cloud TPU, SLURM and MPI are detected)
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    resume: bool = False
    overwrite: bool = False

    def check(self) -> None:
        """Refuse values that cannot work, naming the fix."""
        if self.validate_every < 0:
            raise ConfigError(f"validate_every={self.validate_every}: use a positive number of steps, or 0 for none")
        positive = ["steps", "batch_size", "grad_accum", "vectors", "save_every", "concepts_per_step",
                    "keep_checkpoints", "log_every", "random_crops", "validation_steps", "validation_seeds", "fsdp"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be positive")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"lr_schedule={self.lr_schedule!r}: use 'constant' or 'cosine'")
        if self.init_reg < 0:
            raise ConfigError(f"init_reg={self.init_reg} must be >= 0 (0 turns the pull toward the init word off)")
        if self.progressive_every < 0:
            raise ConfigError(f"progressive_every={self.progressive_every}: use a number of steps, or 0 for off")
        if not 0.0 < self.per_image_mix <= 1.0:
            raise ConfigError(f"per_image_mix={self.per_image_mix} must be in (0, 1]: the share of prompts that name "
                              "the image's own token (with --set per_image_tokens=true)")
        if not 0.0 <= self.flip_p <= 1.0:
            raise ConfigError(f"flip_p={self.flip_p} must be in [0, 1]")
        if self.resolution is not None and self.resolution < 8:
            raise ConfigError(f"resolution={self.resolution} is too small; use the model's size (e.g. 512)")
        if (self.images is None) == (self.concepts is None):
            raise ConfigError("give either --images DIR with --token, or --concepts DIR (one subfolder per concept)")
        if self.images is not None and not self.token:
            raise ConfigError("--images needs --token, the placeholder to learn, e.g. --token '<my-cat>'")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other; choose one")

    def identity(self) -> str:
        """A hash of the fields that define what the run computes (not where or how often it logs or saves)."""
        volatile = {"resume", "overwrite", "save_every", "keep_checkpoints", "validate_every", "log_every", "steps",
                    "out", "validation_steps", "validation_guidance", "validation_sampler", "validation_seeds",
                    "coordinator_address", "num_processes", "process_id"}
        core = {k: v for k, v in dataclasses.asdict(self).items() if k not in volatile}
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


def _coerce(name: str, value: Any) -> Any:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if name not in fields:
        raise ConfigError(f"unknown config field {name!r}; known fields: {', '.join(sorted(fields))}")
    return value


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file at `path`, then `overrides` (None values are skipped)."""
    values: dict[str, Any] = {}
    if path is not None:
        source = Path(path)
        if not source.exists():
            raise ConfigError(f"config file {source} does not exist")
        loaded = yaml.safe_load(source.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source} must hold a mapping of config fields")
        values.update({k: _coerce(k, v) for k, v in loaded.items()})
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _coerce(key, value)
    return TrainConfig(**values)


def parse_set(items: list[str]) -> dict[str, Any]:
    """`--set key=value` pairs; values are parsed as YAML scalars (so 1e-3, true, null work)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set lr_schedule=cosine")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw)
    return out
