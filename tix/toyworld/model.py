"""The toy world's text-to-image model: its configurations and the pure functions that train it from scratch.

The model is Stable Diffusion 1.x in miniature, written as the same diffusers/transformers configs a real checkpoint
carries, so the saved folder loads through every code path a real SD 1.x checkpoint takes (tix and PyTorch diffusers):

- text encoder: transformers `CLIPTextModel` (quick_gelu, causal, pooled at EOS) over the world's words, one BPE token
  per word (`tix.tokenizer.write_clip_tokenizer(vocabulary())`), 77 positions like CLIP so diffusers' padding fits;
- UNet: `UNet2DConditionModel` with 1x1-conv projections and `attention_head_dim` counting heads (SD 1.x conventions);
- VAE: `AutoencoderKL` with two levels: 32 px images <-> 16 x 16 x 4 latents (SD's four latent channels, a
  downsampling of 2 rather than 8). A third level (8 x 8 x 4, and even 8 x 8 x 16) was tried: within the CPU budget
  it kept shape, colour, background and size but blurred the stripes and dots (4-5 px apart) away, so the scorer
  read the pattern of its reconstructions at chance; the two-level VAE reconstructs every attribute at >= 96%;
- scheduler: SD's scaled-linear betas (0.00085 .. 0.012, 1000 steps), epsilon prediction, DDIM config.

Training (driven by ``scripts/train_toyworld.py``) is two stages as in latent diffusion: the VAE alone, then the text
encoder and UNet jointly on the frozen VAE's latents. Between them the VAE is reparametrised so its latents have zero
mean and unit spread per channel (`whiten_vae`), which removed the colour casts the first models painted. A third
stage continues the second with some noun phrases fed as one blended position (`CaptionIds` with `parts`), so one
input vector learns to carry several words. Functions here are pure: parameters in, parameters out.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tix.models.clip import CLIPTextConfig, CLIPTextModel
from tix.models.unet import UNet2DConditionModel, UNetConfig
from tix.models.vae import AutoencoderKL, VAEConfig, sample_latent
from tix.schedule import NoiseSchedule, add_noise, min_snr_weight

IMAGE_SIZE = 32
# The erased words' rows of the trained token table, beside the shipped model (see `erase_words`).
ERASED_FILE = "erased_words.safetensors"
LATENT_SIZE = 16

# A transformers CLIPTextConfig as config.json spells it (vocab_size is filled in from the tokenizer).
TEXT_CONFIG: dict[str, Any] = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    # 128 wide, not 64: at 64 one learned vector obeyed edits no more often than three vectors did; at 128 it obeys
    # them more, the paper's trade-off (README, "the toy world").
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 128,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    # The legacy ids every SD 1.x checkpoint carries; both tix and transformers then pool at the EOS token, which
    # write_clip_tokenizer gives the largest id, as CLIP's BPE does.
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": LATENT_SIZE,
    "in_channels": 4,
    "out_channels": 4,
    # Cross-attention at 8 x 8 and 4 x 4 (and in the mid block) but not at 16 x 16: attention over 256 positions
    # cost more than the rest of the UNet on a CPU, and what captions name is decided at coarse scales.
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "attention_head_dim": 4,
    "cross_attention_dim": TEXT_CONFIG["hidden_size"],
    "norm_num_groups": 8,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "use_linear_projection": False,
    "upcast_attention": False,
}

VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "sample_size": IMAGE_SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "act_fn": "silu",
    "scaling_factor": 1.0,  # replaced by 1 / std of the trained encoder's latents
    "force_upcast": False,
    # Without the mid-block attention: on a CPU it doubled the cost of a VAE step and the world has no long-range
    # structure for it to capture.
    "mid_block_add_attention": False,
}

SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}


def text_config(vocab_size: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The text encoder's config.json for a tokenizer of `vocab_size` ids, whose EOS is the last id."""
    return {**TEXT_CONFIG, "vocab_size": vocab_size, **(overrides or {})}


def unet_config(overrides: dict[str, Any] | None = None, text_width: int | None = None) -> dict[str, Any]:
    """The UNet's config.json; its cross-attention reads `text_width`-wide states (the text encoder's hidden_size)."""
    width = text_width or TEXT_CONFIG["hidden_size"]
    return {**UNET_CONFIG, "cross_attention_dim": width, **(overrides or {})}


def vae_config(scaling_factor: float = 1.0, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**VAE_CONFIG, **(overrides or {}), "scaling_factor": float(scaling_factor)}


def build_models(text_cfg: dict[str, Any], unet_cfg: dict[str, Any], vae_cfg: dict[str, Any]) -> dict[str, Any]:
    """The Linen modules, built through the same `from_diffusers` validation `tix.load` uses on the saved files."""
    return {
        "text_encoder": CLIPTextModel(CLIPTextConfig.from_diffusers(text_cfg)),
        "unet": UNet2DConditionModel(UNetConfig.from_diffusers(unet_cfg)),
        "vae": AutoencoderKL(VAEConfig.from_diffusers(vae_cfg)),
    }


def init_params(models: dict[str, Any], rng: jax.Array) -> dict[str, Any]:
    """Fresh parameters of every component (Linen's default initialisers)."""
    k_text, k_unet, k_vae = jax.random.split(rng, 3)
    vae = models["vae"]
    images = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, vae.config.in_channels), jnp.float32)
    return {
        "text_encoder": models["text_encoder"].init_params(k_text),
        "unet": models["unet"].init_params(k_unet, height=LATENT_SIZE, width=LATENT_SIZE),
        "vae": vae.init(k_vae, images)["params"],
    }


def to_model_range(images: np.ndarray | jax.Array) -> jax.Array:
    """uint8 [B, H, W, 3] -> float32 in [-1, 1], the range SD's VAE sees."""
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


# ---- stage 1: the VAE -------------------------------------------------------------------------------------------


def vae_loss(
    vae: AutoencoderKL, params: dict[str, Any], images: jax.Array, rng: jax.Array, kl_weight: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L1 + L2 reconstruction of a posterior sample, plus a small KL to N(0, 1) (per latent element), as in
    latent diffusion's autoencoder without its adversarial and perceptual terms: the world has no texture a
    pixel loss misses."""
    mean, logvar = vae.apply({"params": params}, images, method=vae.encode)
    z = sample_latent(rng, mean, logvar)
    recon = vae.apply({"params": params}, z, method=vae.decode).astype(jnp.float32)
    err = recon - images
    l1 = jnp.mean(jnp.abs(err))
    l2 = jnp.mean(err * err)
    kl = 0.5 * jnp.mean(mean * mean + jnp.exp(logvar) - 1.0 - logvar)
    return l1 + l2 + kl_weight * kl, {"l1": l1, "l2": l2, "kl": kl}


def make_vae_step(vae: AutoencoderKL, optimizer: optax.GradientTransformation, kl_weight: float) -> Callable:
    """A jitted `(params, opt_state, images_uint8, rng) -> (params, opt_state, metrics)`."""

    @jax.jit
    def step(params, opt_state, images, rng):
        grad_fn = jax.value_and_grad(partial(vae_loss, vae), has_aux=True)
        (loss, aux), grads = grad_fn(params, to_model_range(images), rng, kl_weight)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, **aux}

    return step


def make_encode(vae: AutoencoderKL) -> Callable:
    """A jitted `(params, images_uint8) -> (mean, logvar)` of the posterior, unscaled."""

    @jax.jit
    def encode(params, images):
        return vae.apply({"params": params}, to_model_range(images), method=vae.encode)

    return encode


def make_decode(vae: AutoencoderKL) -> Callable:
    """A jitted `(params, unscaled_latents) -> uint8 images`."""

    @jax.jit
    def decode(params, latents):
        x = vae.apply({"params": params}, latents, method=vae.decode)
        return jnp.round((jnp.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)

    return decode


def latent_scaling_factor(means: np.ndarray) -> float:
    """SD's rule: 1 / std of the (unscaled) latents over a sample of images, so the UNet sees unit variance."""
    return float(1.0 / np.std(np.asarray(means, np.float64)))


def whiten_vae(params: dict[str, Any], channel_mean: np.ndarray, channel_std: np.ndarray) -> dict[str, Any]:
    """The same autoencoder reparametrised so its latents are (z - channel_mean) / channel_std: zero mean and unit
    spread per channel, folded into the 1x1 quant_conv (encoder side) and post_quant_conv (decoder side), so the
    saved VAE is still a plain AutoencoderKL and decode(encode(x)) is unchanged.

    Why: SD's pipeline only multiplies latents by one scaling_factor (no shift), and its schedule leaves about 7%
    of the signal at the last training step, so a model trained on latents with a per-channel offset learns to
    read that offset from x_T and, sampling from zero-mean noise, paints every image with a colour cast.
    """
    m = np.asarray(channel_mean, np.float32)
    s = np.asarray(channel_std, np.float32)
    c = m.shape[0]
    out = jax.tree.map(np.asarray, params)
    q = dict(out["quant_conv"])
    kernel, bias = np.array(q["kernel"]), np.array(q["bias"])
    kernel[..., :c] /= s
    bias[:c] = (bias[:c] - m) / s
    bias[c:] -= 2.0 * np.log(s)  # logvar of (z - m) / s
    out["quant_conv"] = {"kernel": kernel, "bias": bias}
    pq = dict(out["post_quant_conv"])
    kernel, bias = np.array(pq["kernel"]), np.array(pq["bias"])
    bias = bias + m @ kernel[0, 0]  # W (s z' + m) + b
    kernel[0, 0] *= s[:, None]
    out["post_quant_conv"] = {"kernel": kernel, "bias": bias}
    return out


# ---- stages 2 and 3: text encoder + UNet ------------------------------------------------------------------------


def encode_captions(text_encoder: Any, params: dict[str, Any], ids: jax.Array) -> jax.Array:
    """The text encoder's last hidden state for [B, T] ids, or for [B, T, parts] blended ids (`CaptionIds`): a
    position's input is then the mean of its words' token rows."""
    if ids.ndim == 2:
        return text_encoder.apply({"params": params}, ids).last_hidden_state
    from tix.models.clip import token_table

    used = (ids >= 0).astype(jnp.float32)
    rows = jnp.take(token_table(params), jnp.maximum(ids, 0), axis=0) * used[..., None]
    embeds = rows.sum(axis=-2) / jnp.maximum(used.sum(axis=-1), 1.0)[..., None]
    return text_encoder.apply({"params": params}, ids[..., 0], inputs_embeds=embeds).last_hidden_state


def diffusion_loss(
    models: dict[str, Any],
    schedule: NoiseSchedule,
    trainable: dict[str, Any],
    latents: jax.Array,
    ids: jax.Array,
    rng: jax.Array,
    snr_gamma: float | None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The epsilon loss of SD training on already scaled latents, with the text encoder trained through it.

    Timesteps are uniform over the 1000 training steps, stratified across the batch (one random offset, then evenly
    spaced), which lowers the variance of the batch loss at no cost. With `snr_gamma`, each example's loss is
    weighted by min-SNR-gamma (`tix.schedule.min_snr_weight`), which spends less of a small budget on nearly
    noise-free steps.
    """
    k_t, k_noise = jax.random.split(rng)
    b = latents.shape[0]
    n = schedule.num_train_timesteps
    u = (jax.random.uniform(k_t) + jnp.arange(b) / b) % 1.0
    t = jnp.minimum((u * n).astype(jnp.int32), n - 1)
    noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
    noisy = add_noise(schedule, latents, noise, t)
    context = encode_captions(models["text_encoder"], trainable["text_encoder"], ids)
    pred = models["unet"].apply({"params": trainable["unet"]}, noisy, t, context).astype(jnp.float32)
    per_example = jnp.mean((pred - noise) ** 2, axis=(1, 2, 3))
    mse = jnp.mean(per_example)
    if snr_gamma is None:
        return mse, {"mse": mse}
    weight = min_snr_weight(schedule, t, snr_gamma)
    return jnp.mean(weight * per_example), {"mse": mse}


def make_diffusion_step(
    models: dict[str, Any],
    schedule: NoiseSchedule,
    optimizer: optax.GradientTransformation,
    *,
    snr_gamma: float | None = 5.0,
    ema_decay: float = 0.999,
) -> Callable:
    """A jitted `(trainable, ema, opt_state, latent_mean, latent_logvar, scaling, ids, rng) -> (trainable, ema,
    opt_state, metrics)`: samples the posterior (as SD trains), scales it, takes one AdamW step on the text encoder
    and UNet together, and updates an exponential moving average of their weights (warmed up as 1 - 1/(10 + n) so
    early averages are not dominated by the random initialisation)."""

    @jax.jit
    def step(trainable, ema, opt_state, mean, logvar, scaling, ids, rng, count):
        k_post, k_loss = jax.random.split(rng)
        latents = sample_latent(k_post, mean, logvar) * scaling
        grad_fn = jax.value_and_grad(partial(diffusion_loss, models, schedule), has_aux=True)
        (loss, aux), grads = grad_fn(trainable, latents, ids, k_loss, snr_gamma)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        decay = jnp.minimum(ema_decay, 1.0 - 1.0 / (10.0 + count))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, trainable)
        return trainable, ema, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}

    return step


def adamw(lr: float, steps: int, *, warmup: int = 200, weight_decay: float = 1e-2, clip: float = 1.0):
    """AdamW with linear warmup, cosine decay to a tenth, and global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, max(steps - 1, 1)), max(steps, 2), lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(clip), optax.adamw(schedule, weight_decay=weight_decay))


class CaptionIds:
    """Token ids for captions, memoised: the world's captions come from a few thousand distinct strings, and the
    Python BPE tokenizer is the slowest part of feeding the model on a CPU.

    With `parts` > 1 the ids are [B, length, parts]: each position lists the words it blends (a caption word
    joined with `world.BLEND`, see `world.blend_noun`), padded with -1; `diffusion_loss` feeds such a position the
    mean of its words' token rows."""

    def __init__(self, tokenizer: Any, length: int = 77, parts: int = 1):
        self.tokenizer = tokenizer
        self.length = length
        self.parts = parts
        self.cache: dict[str, np.ndarray] = {}

    def __call__(self, captions: Sequence[str]) -> np.ndarray:
        missing = sorted({c for c in captions if c not in self.cache})
        if missing and self.parts > 1:
            self.cache.update((c, self._blended(c)) for c in missing)
        elif missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.length, truncation=True).input_ids
            self.cache.update(zip(missing, np.asarray(ids, np.int32), strict=True))
        return np.stack([self.cache[c] for c in captions])

    def _blended(self, caption: str) -> np.ndarray:
        from tix.toyworld.world import BLEND

        flat = self.tokenizer(caption.replace(BLEND, " ")).input_ids  # BOS, one token per world word, EOS
        sizes = [1] + [len(w.split(BLEND)) for w in caption.split()] + [1]
        if max(sizes) > self.parts or len(sizes) > self.length or sum(sizes) != len(flat):
            raise ValueError(f"caption {caption!r}: more than {self.parts} blended words, too long, or a word that "
                             "is not one token")
        out = np.full((self.length, self.parts), -1, np.int32)
        out[len(sizes):, 0] = self.tokenizer.pad_token_id
        for position, end in enumerate(np.cumsum(sizes)):
            out[position, : sizes[position]] = flat[end - sizes[position] : end]
        return out


# ---- erasing words ----------------------------------------------------------------------------------------------


def erase_words(
    text_params: dict[str, Any], trained_vocab: dict[str, int], shipped_vocab: dict[str, int], words: Sequence[str]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The text encoder's parameters for the shipped tokenizer, and the token-table rows of the erased `words`.

    The model is trained with a tokenizer that has every word; the shipped one lacks `words`. Each shipped token
    string takes the row its string had in training (ids shift, since the BPE vocabulary is rebuilt without the
    words and their merge pieces), so every remaining prompt encodes exactly as in training while no prompt can
    produce an erased row. The erased rows are returned keyed by word, for measuring how near inversion comes."""
    from tix.models.clip import token_table

    table = np.asarray(token_table(text_params), np.float32)
    missing = [t for t in shipped_vocab if t not in trained_vocab]
    if missing:
        raise ValueError(f"shipped tokens {missing[:5]} are not in the training vocabulary")
    order = sorted(shipped_vocab, key=shipped_vocab.__getitem__)
    shipped = table[[trained_vocab[t] for t in order]]
    erased = {w: table[trained_vocab[w + "</w>"]].copy() for w in words}
    return _with_token_table(text_params, shipped), erased


def restore_words(
    text_params: dict[str, Any], shipped_vocab: dict[str, int], trained_vocab: dict[str, int],
    erased: dict[str, np.ndarray],
) -> dict[str, Any]:
    """`erase_words` undone: the text encoder's parameters for the training tokenizer, each token string's row where
    the shipped table has it and the `erased` rows (word -> row) back in their words' places. The erased words' BPE
    merge pieces never occur alone in training, so their rows are zero."""
    from tix.models.clip import token_table

    shipped = np.asarray(token_table(text_params), np.float32)
    table = np.zeros((len(trained_vocab), shipped.shape[1]), np.float32)
    for token, i in trained_vocab.items():
        if token in shipped_vocab:
            table[i] = shipped[shipped_vocab[token]]
        elif token.endswith("</w>") and token[:-4] in erased:
            table[i] = np.asarray(erased[token[:-4]], np.float32).reshape(-1)
    return _with_token_table(text_params, table)


def _with_token_table(text_params: dict[str, Any], table: np.ndarray) -> dict[str, Any]:
    """`text_params` (with or without the outer "params" collection) with its token table replaced; no copies."""
    from tix.models.clip import TOKEN_TABLE_PATH

    def replace(node: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
        return {**node, path[0]: table if len(path) == 1 else replace(node[path[0]], path[1:])}

    root = "params" in text_params
    tree = replace(text_params["params"] if root else text_params, TOKEN_TABLE_PATH)
    return {"params": tree} if root else tree


# ---- saving -----------------------------------------------------------------------------------------------------


def save_pipeline(
    folder: str | Path,
    params: dict[str, Any],
    configs: dict[str, dict[str, Any]],
    *,
    dtype: Any = np.float16,
    erased: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write a diffusers StableDiffusionPipeline folder: model_index.json, unet/, vae/, text_encoder/ (transformers
    layout, "text_model."-prefixed keys), tokenizer/ and scheduler/.

    UNet and VAE weights are stored in `dtype` (fp16 halves the package; tix.load and diffusers cast them to the
    dtype asked for, float32 by default). The text encoder stays float32: transformers 5 loads a checkpoint in its
    stored dtype unless told otherwise, so fp16 text weights beside diffusers' float32 UNet would make a plain
    `StableDiffusionPipeline.from_pretrained(folder)` fail on a Half/Float mismatch.

    `erased` (word -> token-table row, from `erase_words`) is written beside the components as ERASED_FILE, a
    textual-inversion file with one token `<word>` per word, which tix and diffusers load like any learned token."""
    from safetensors.numpy import save_file

    from tix.tokenizer import write_clip_tokenizer
    from tix.toyworld.world import vocabulary
    from tix.weights import to_torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def write(component: str, filename: str, tree: dict[str, Any], config: dict[str, Any], config_name: str) -> None:
        sub = folder / component
        sub.mkdir(exist_ok=True)
        kind = np.float32 if component == "text_encoder" else dtype
        state = {k: np.ascontiguousarray(np.asarray(v, np.float32).astype(kind)) for k, v in to_torch(tree).items()}
        save_file(state, str(sub / filename), metadata={"format": "pt"})
        (sub / config_name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    write("unet", "diffusion_pytorch_model.safetensors", params["unet"], configs["unet"], "config.json")
    write("vae", "diffusion_pytorch_model.safetensors", params["vae"], configs["vae"], "config.json")
    write("text_encoder", "model.safetensors", params["text_encoder"], configs["text_encoder"], "config.json")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(configs["scheduler"], indent=2) + "\n")
    write_clip_tokenizer(folder / "tokenizer", vocabulary())
    if erased:
        tokens = {f"<{w}>": np.asarray(v, np.float32)[None] for w, v in erased.items()}
        save_file(tokens, str(folder / ERASED_FILE), metadata={"format": "pt"})
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder
