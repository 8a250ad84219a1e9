"""The run configuration of `tix invert`: the defaults below, then a --config file (presets live in configs/), then
flags and `--set key=value` overrides. The resolved config is saved in the run folder and decides whether a
folder may be reused."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from tix.errors import ConfigError
from tix.sampler_names import SAMPLERS


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
    # images per concept per step. A hyperparameter (lr scales with it, each concept's gradient is a mean over it), so
    # it is never sized to the device: concepts_per_step is what fills a device
    batch_size: int = 4
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
    # >0: draw timesteps with density ~ (t / T)^bias, the noisy end more often (0: uniform, the paper's); see
    # tix.schedule.training_timesteps
    timestep_bias: float = 0.0
    # each sample's loss divided by the frozen model's loss at its noise level (a tenth of the schedule) with the
    # initial vectors, so every level counts alike; see train.level_balance
    balance_noise_levels: bool = False
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
    # concepts trained by one step; more run in waves reusing the compiled step. None: as many as fill the device's
    # memory (GPU/TPU; train.compile_plan.choose_concepts_per_step), 16 where no memory limit is known (CPU).
    # A resumed run keeps the number its config.yaml records.
    concepts_per_step: int | None = None
    save_every: int = 500
    keep_checkpoints: int = 3
    validate_every: int = 500  # 0: no validation images
    validation_steps: int = 25
    validation_guidance: float = 7.5
    validation_sampler: str = "dpm++2m"
    validation_seeds: int = 2
    log_every: int = 10
    # compiled steps persist here, so a second run with the same shapes starts without compiling. None:
    # $JAX_COMPILATION_CACHE_DIR if set, else the user cache folder ($XDG_CACHE_HOME/tix/jax or ~/.cache/tix/jax);
    # "" or "off": no cache
    compile_cache: str | None = None
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
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        for name in _float_fields(TrainConfig):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"{name}={value} must be a finite number")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be positive")
        if self.adam_eps <= 0:
            raise ConfigError(f"adam_eps={self.adam_eps} must be positive (e.g. 1e-8)")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay={self.weight_decay} must be 0 or positive")
        for name in ("adam_b1", "adam_b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1)")
        for name in ("max_grad_norm", "min_snr_gamma"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive, or null for none")
        if self.validation_sampler not in SAMPLERS:
            raise ConfigError(f"validation_sampler={self.validation_sampler!r}: use one of {', '.join(SAMPLERS)}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"lr_schedule={self.lr_schedule!r}: use 'constant' or 'cosine'")
        if self.timestep_bias < 0:
            raise ConfigError(f"timestep_bias={self.timestep_bias} must be >= 0 (0 draws timesteps uniformly; 1 makes "
                              "the noisiest twice as likely as the middle ones)")
        if self.balance_noise_levels and self.min_snr_gamma is not None:
            raise ConfigError(f"balance_noise_levels and min_snr_gamma={self.min_snr_gamma} both weigh the noise "
                              "levels' losses: choose one (--set min_snr_gamma=null, or balance_noise_levels=false)")
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
                    "coordinator_address", "num_processes", "process_id", "compile_cache"}
        core = {k: v for k, v in dataclasses.asdict(self).items() if k not in volatile}
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> TrainConfig:
        """A run's saved config.yaml (`to_yaml`) read back as it was written, without defaults or checks."""
        return cls(**yaml.safe_load(text))


def _float_fields(cls: type) -> list[str]:
    return [name for name, hint in typing.get_type_hints(cls).items() if float in _allowed(hint)[0]]


def _allowed(hint: Any) -> tuple[tuple[Any, ...], bool]:
    """The non-None types a field annotation allows, and whether it allows None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        return tuple(a for a in args if a is not type(None)), type(None) in args
    return (hint,), False


_TRUE, _FALSE = {"true", "yes", "on"}, {"false", "no", "off"}


def _convert(hint: Any, value: Any) -> Any:
    """`value` as type `hint`, or raise ValueError. Strings are parsed (YAML reads `1e-3` as a string)."""
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError
    if hint is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)  # exact, however long
        number = float(value)  # "2e3" or 2000.0; text and non-numbers raise
        if number.is_integer():
            return int(number)
        raise ValueError
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        return float(value)
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a model or token spelled as a number
        raise ValueError
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ValueError
        return [_convert(item, v) for v in items]
    return value


def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def coerce(cls: type, name: str, value: Any, where: str = "") -> Any:
    """`value` converted to the type of field `name` of dataclass `cls`, or a ConfigError naming the field, the type
    wanted and where the value came from."""
    hints = typing.get_type_hints(cls)
    if name not in hints:
        raise ConfigError(f"{where}unknown config field {name!r}; known fields: {', '.join(sorted(hints))}")
    types_, optional = _allowed(hints[name])
    if value is None:
        if optional:
            return None
    else:
        for hint in types_:
            try:
                return _convert(hint, value)
            except (ValueError, TypeError, OverflowError):
                continue
    wanted = " or ".join([_type_name(h) for h in types_] + (["null"] if optional else []))
    raise ConfigError(f"{where}{name} must be {wanted}, not {value!r}")


def _coerce(name: str, value: Any, where: str = "") -> Any:
    return coerce(TrainConfig, name, value, where)


def read_yaml(path: Path, text: str) -> Any:
    """Parse YAML, turning a syntax error into a ConfigError that names the file and the line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        line = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{line}: not valid YAML ({problem}); fix the file") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file at `path`, then `overrides` (None values are skipped)."""
    values: dict[str, Any] = {}
    if path is not None:
        source = Path(path)
        if not source.exists():
            raise ConfigError(f"config file {source} does not exist")
        loaded = read_yaml(source, source.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source} must hold a mapping of config fields (key: value lines)")
        values.update({str(k): _coerce(str(k), v, f"{source}: ") for k, v in loaded.items()})
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _coerce(key, value)
    return TrainConfig(**values)


def parse_set(items: list[str]) -> dict[str, Any]:
    """`--set key=value` pairs; values are parsed as YAML scalars (so true, null, [a, b] work), then converted to the
    field's type (so 1e-3, which YAML reads as a string, is a float for `lr`), or refused naming the field."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set lr_schedule=cosine")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""  # empty: the empty string, not "unset"
        except yaml.YAMLError:
            value = raw  # not YAML (e.g. an unbalanced quote): the field's type decides below
        hints = typing.get_type_hints(TrainConfig)
        if key in hints and str in _allowed(hints[key])[0] and isinstance(value, (bool, int, float)):
            value = raw.strip()  # a text field keeps the text as typed (`--set init=yes` is the word "yes")
        out[key] = _coerce(key, value, f"--set {item}: ")
    return out
