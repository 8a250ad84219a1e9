"""`StableDiffusion`: a frozen Stable Diffusion (SD 1.x, 2.x or XL) in JAX, with the text side open to new tokens.

The object holds the Linen modules, their parameters and the tokenizers. Every computation is a pure function of
explicit parameters (`*_fn` methods take `params`), so training and sampling pass the frozen weights into their compiled
functions as arguments rather than closing over them as constants (which XLA would fold into the executable, costing
memory and compile time). The convenience methods (`encode_prompts`, `predict_noise`, ...) bind `self.params`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from tix import samplers
from tix.errors import ConfigError, TixError
from tix.models import clip
from tix.models.unet import UNet2DConditionModel
from tix.models.vae import AutoencoderKL
from tix.schedule import NoiseSchedule

log = logging.getLogger("tix")
Kind = Literal["sd1", "sd2", "sdxl"]
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclasses.dataclass
class TextSide:
    """One text encoder with its tokenizer and the placeholder tokens added to it.

    Placeholder token k gets id `vocab_size + k` whatever the tokenizer's own numbering is; its vector is row k of
    `extra`. The CLIP table itself is never copied or extended.
    """

    name: str
    model: clip.CLIPTextModel
    tokenizer: Any
    added: list[str] = dataclasses.field(default_factory=list)
    extra: np.ndarray | None = None

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    @property
    def max_length(self) -> int:
        return min(self.tokenizer.model_max_length, self.model.config.max_position_embeddings)

    def token_counts(self, prompts: Sequence[str]) -> list[int]:
        """How many tokens each prompt takes, start and end included, before any truncation."""
        ids = self.tokenizer(list(prompts), truncation=False, verbose=False).input_ids  # verbose: no length warning
        return [len(i) for i in ids]

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """[B, 77] int32 ids, padded and truncated as diffusers does; placeholders map to vocab_size + k."""
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True
        ).input_ids
        ids = np.asarray(ids, dtype=np.int64)
        base = len(self.tokenizer) - len(self.added)
        placeholder = ids >= base
        ids = np.where(placeholder, ids - base + self.vocab_size, ids)
        return ids.astype(np.int32)


@dataclasses.dataclass
class StableDiffusion:
    """A frozen Stable Diffusion loaded by `tix.load`. See the module docstring for the calling convention."""

    kind: Kind
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text: tuple[TextSide, ...]
    params: dict[str, Any]
    schedule: NoiseSchedule
    scheduler_config: dict[str, Any]
    default_size: int = 512  # pixels: the UNet's sample_size x the VAE's scale factor
    source: str = ""
    # Compiled entry points of this model (see `_cache`); a new object (dataclasses.replace) starts with none.
    _compiled: dict[Any, Any] = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)
    _warned: set[str] = dataclasses.field(default_factory=set, init=False, repr=False, compare=False)

    # ---- facts -------------------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


    @property
    def prediction_type(self) -> str:
        return self.schedule.prediction_type

    # ---- placeholder tokens ------------------------------------------------------------------------------------
    def add_tokens(self, token: str, vectors: Sequence[np.ndarray | None]) -> list[str]:
        """Register `token` with one [n, D] array per text encoder (None: zeros, for training to fill in).

        A multi-vector token is stored as `token`, `token_1`, ... (diffusers' naming) and prompts are expanded
        accordingly. Returns the sub-token names.
        """
        if len(vectors) != len(self.text):
            raise TixError(
                f"{token}: got vectors for {len(vectors)} text encoders, this {self.kind} model has {len(self.text)}"
            )
        # A lone [D] vector is one vector: counting its first axis would register D sub-tokens with one row.
        vectors = [None if v is None else np.atleast_2d(np.asarray(v, np.float32)) for v in vectors]
        for v in vectors:
            if v is not None and v.ndim != 2:
                raise TixError(f"{token}: vectors must be [n, D] (or one [D] vector), got shape {v.shape}")
        n = {v.shape[0] for v in vectors if v is not None} or {1}
        if len(n) != 1:
            raise TixError(f"{token}: the text encoders' vector counts differ ({sorted(n)}); they must be equal")
        (count,) = n
        names = [token] + [f"{token}_{i}" for i in range(1, count)]
        # Check every encoder before changing any: a refusal on text_encoder_2 must not leave the token half-added
        # to text_encoder (its tokenizer would then be out of step with `added`).
        checked = []
        for side, vecs in zip(self.text, vectors, strict=True):
            for name in names:
                # Prompts are lower-cased before tokens are matched, so '<Cat>' and '<cat>' would be one token.
                if name.lower() in {a.lower() for a in side.added} or self._in_base_vocab(side, name):
                    raise TixError(
                        f"token {name!r} is already in the {side.name} vocabulary; choose another placeholder "
                        "(e.g. wrap it in angle brackets: '<my-cat>')"
                    )
            vecs = np.zeros((count, side.width), np.float32) if vecs is None else vecs
            if vecs.shape[-1] != side.width:
                raise TixError(
                    f"{token}: vectors of width {vecs.shape[-1]} do not fit {side.name} of width {side.width} "
                    f"(this is a {self.kind} model); the embedding was trained for a different model family"
                )
            checked.append(vecs)
        for side, vecs in zip(self.text, checked, strict=True):
            side.tokenizer.add_tokens([_added_token(name, whole_word=_whole_word(token)) for name in names])
            side.added.extend(names)
            side.extra = vecs if side.extra is None else np.concatenate([side.extra, vecs])
        return names

    @staticmethod
    def _in_base_vocab(side: TextSide, name: str) -> bool:
        ids = side.tokenizer(name, add_special_tokens=False).input_ids
        return len(ids) == 1 and ids[0] < len(side.tokenizer) - len(side.added)

    def expand_prompt(self, prompt: str) -> str:
        """Spell multi-vector tokens out (`<t>` -> `<t> <t>_1 <t>_2`) as diffusers' maybe_convert_prompt does.

        A token is expanded wherever the CLIP tokenizer will split it out, so every occurrence gets all its vectors:
        the tokenizer finds added tokens anywhere in the text (also next to punctuation or inside a word, as in
        "(<t>)", "<t>s", "a,<t>"), ignoring case (CLIP lower-cases text first), longest name first; a plain-word
        token ("kt") only as a whole word (see `_whole_word`). A spelled-out sub-token such as `<t>_1` is left alone.
        """
        added = self.text[0].added
        if not added:
            return prompt
        canonical = {name.lower(): name for name in added}
        counts = {}
        for name in added:
            count = 1
            while f"{name}_{count}" in canonical.values():
                count += 1
            counts[name] = count
        if max(counts.values()) == 1:
            return prompt
        # One pass over an alternation ordered longest first finds the same matches as the tokenizer's trie.
        whole = {t.content for t in self.text[0].tokenizer.added_tokens_decoder.values() if t.single_word}
        pattern = "|".join(_token_pattern(name, name in whole)
                           for name in sorted(canonical.values(), key=len, reverse=True))

        def spell(match: re.Match) -> str:
            name = canonical[match.group(0).lower()]
            if counts[name] == 1:
                return match.group(0)
            return " ".join([name] + [f"{name}_{i}" for i in range(1, counts[name])])

        return re.sub(pattern, spell, prompt, flags=re.IGNORECASE)

    def load_embeddings(self, source: Any, token: str | None = None) -> list[str]:
        """Add the tokens of an embedding file (any format tix reads) or dict to this model; returns their names."""
        from tix import embedding_files

        names = []
        concepts = embedding_files.read(source, token=token)
        # All checked before any is added, so a folder with one unfit file adds nothing.
        for concept in concepts:
            embedding_files.check_compatible(concept, {s.name: s.width for s in self.text}, self.kind)
        for concept in concepts:
            vectors = [concept.vectors[s.name] for s in self.text]
            self.add_tokens(concept.token, vectors)
            names.append(concept.token)
        return names

    # ---- pure functions ----------------------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, ...]:
        """Token ids for each text encoder, prompts expanded for multi-vector tokens. A prompt longer than the text
        encoder reads is cut at its end, as diffusers does, with a warning (once per prompt)."""
        expanded = [self.expand_prompt(p) for p in prompts]
        for prompt, count in zip(prompts, self.token_counts(prompts, expanded=expanded), strict=True):
            if count > self.max_length and prompt not in self._warned:
                self._warned.add(prompt)
                shown = prompt if len(prompt) <= 120 else prompt[:117] + "..."
                log.warning(f"prompt {shown!r} is {count} tokens long; the text encoder reads only the first "
                            f"{self.max_length} (start and end tokens included), the rest is ignored")
        return tuple(side.tokenize(expanded) for side in self.text)

    @property
    def max_length(self) -> int:
        """The most tokens a prompt may take, start and end tokens included (77 for every Stable Diffusion)."""
        return min(side.max_length for side in self.text)

    def token_counts(self, prompts: Sequence[str], *, expanded: Sequence[str] | None = None) -> list[int]:
        """How many tokens each prompt takes (multi-vector tokens spelled out, start and end included), before the
        truncation to `max_length`; the largest over the text encoders."""
        expanded = [self.expand_prompt(p) for p in prompts] if expanded is None else expanded
        counts = [side.token_counts(expanded) for side in self.text]
        return [max(c) for c in zip(*counts, strict=True)]

    def text_fn(
        self, params: dict[str, Any], ids: Sequence[jax.Array], extra: Sequence[jax.Array | None]
    ) -> tuple[jax.Array, jax.Array | None]:
        """(context, pooled) from token ids; placeholder ids read their vectors from `extra` (one array per encoder).

        SD 1.x/2.x: context is the last hidden state (after the final layer norm). SDXL: the penultimate hidden states
        of both encoders concatenated, and pooled is text_encoder_2's projection of the EOS state. The pooled output is
        taken at the first EOS token (see `tix.models.clip`), not at argmax(ids) as transformers' legacy rule does.
        """
        contexts, pooled = [], None
        for side, side_ids, side_extra in zip(self.text, ids, extra, strict=True):
            out = side.model.apply(
                {"params": params[side.name]},
                side_ids,
                extra_embeddings=side_extra,
                eos_token_id=side.tokenizer.eos_token_id,
                output_hidden_states=self.kind == "sdxl",
            )
            if self.kind == "sdxl":
                contexts.append(out.hidden_states[-2])
                if side.model.config.with_projection:
                    pooled = out.text_embeds
            else:
                contexts.append(out.last_hidden_state)
        context = contexts[0] if len(contexts) == 1 else jnp.concatenate(contexts, axis=-1)
        return context, pooled

    def unet_fn(
        self,
        params: dict[str, Any],
        latents: jax.Array,
        timesteps: jax.Array,
        context: jax.Array,
        pooled: jax.Array | None = None,
        time_ids: jax.Array | None = None,
    ) -> jax.Array:
        added = None
        if self.kind == "sdxl":
            if pooled is None:
                raise TixError("SDXL needs the pooled text embedding: pass the `pooled` that encode_prompts returned")
            if time_ids is None:
                size = latents.shape[1] * self.vae_scale_factor, latents.shape[2] * self.vae_scale_factor
                time_ids = default_time_ids(latents.shape[0], size)
            added = {"text_embeds": pooled, "time_ids": time_ids}
        return self.unet.apply({"params": params["unet"]}, latents, timesteps, context, added)

    def encode_fn(self, params: dict[str, Any], images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images NHWC in [-1, 1] -> the latent distribution (mean, logvar), unscaled."""
        return self.vae.apply({"params": params["vae"]}, images, method=self.vae.encode)

    def scale_latents(self, latents: jax.Array) -> jax.Array:
        cfg = self.vae.config
        return (latents - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    def unscale_latents(self, latents: jax.Array) -> jax.Array:
        cfg = self.vae.config
        return latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)

    def decode_fn(self, params: dict[str, Any], latents: jax.Array) -> jax.Array:
        return self.vae.apply({"params": params["vae"]}, self.unscale_latents(latents), method=self.vae.decode)

    # ---- convenience API bound to self.params -------------------------------------------------------------------
    def extras(self) -> tuple[jax.Array | None, ...]:
        return tuple(None if s.extra is None else jnp.asarray(s.extra) for s in self.text)

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array | None]:
        """(context, pooled): the UNet's cross-attention input as diffusers' `encode_prompt` gives it without
        classifier-free guidance; pooled is SDXL's pooled text embedding and None for SD 1.x/2.x."""
        return _jit_text(self)(self.params, tuple(map(jnp.asarray, self.tokenize(prompts))), self.extras())

    def predict_noise(self, latents, timesteps, context, pooled=None, time_ids=None) -> jax.Array:
        """The UNet's output (epsilon or v, per the scheduler config) for NHWC latents."""
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (latents.shape[0],))
        return _jit_unet(self)(self.params, latents, timesteps, context, pooled, time_ids)

    def encode_images(self, images) -> jax.Array:
        """Images NHWC in [-1, 1] -> scaled latent means (`latent_dist.mean * scaling_factor`)."""
        return _jit_encode(self)(self.params, jnp.asarray(images))

    def decode_latents(self, latents) -> jax.Array:
        """Scaled latents -> images NHWC in [-1, 1] (not clipped)."""
        return _jit_decode(self)(self.params, jnp.asarray(latents))

    def generate(
        self,
        prompts: Sequence[str],
        *,
        negative: Sequence[str] | str | None = None,
        steps: int = 25,
        guidance: float = 7.5,
        sampler: str = "dpm++2m",
        seed: int = 0,
        size: int | tuple[int, int] | None = None,
        image: np.ndarray | None = None,
        strength: float = 0.8,
        mask: np.ndarray | None = None,
        mesh: jax.sharding.Mesh | None = None,
        latents: np.ndarray | None = None,
    ) -> np.ndarray:
        """Images (uint8 NHWC) for `prompts`, the whole denoising loop in one compiled function, batch over `mesh`.

        `sampler`: one of `tix.sampler_names.SAMPLERS` ("ddim", "euler", "dpm++2m", "euler-karras", "dpm++2m-karras",
        "euler-ancestral", "dpm++2m-sde", "dpm++2m-sde-karras"), each the matching diffusers scheduler built from the
        model's scheduler config. The fresh noise the last three add at every step comes from `seed` too
        (`step_keys`), also when `latents` are given.

        With `image` (uint8 [H, W, 3], or [B, H, W, 3] one per prompt) this is image-to-image as in diffusers' img2img
        pipeline: the image's VAE latent mean is noised to the level of step `steps - int(steps * strength)` and only
        the steps from there on run, so `strength` 1 keeps nothing of the image but its layout's faint trace and small
        strengths change little. With `mask` ([H, W] or [B, H, W]: 1 or 255 where to edit, 0 where to keep; bool,
        uint8 or floats in [0, 1]) as well, only the masked part is edited: outside it the latents are reset to the
        image's at every step (Blended Latent Diffusion). The mask is averaged over each latent cell, so its edge is
        soft over one cell (`vae_scale_factor` pixels: 8 in Stable Diffusion). The output has the image's size.

        `latents`: the starting noise [len(prompts), h, w, c] (NHWC, unit variance, before the sampler's initial
        sigma, as diffusers' `latents=`) instead of drawing it from `seed`.
        """
        from tix import parallel

        n = len(prompts)
        if image is not None:
            image = image_rows(image, n)
            if size is not None and tuple(np.broadcast_to(size, 2)) != image.shape[1:3]:
                raise ConfigError(f"size {size} differs from the image's {image.shape[2]}x{image.shape[1]}; "
                                  "resize the image instead")
            size = image.shape[1:3]
            samplers.start_step(steps, strength)  # a bad strength fails here, before anything compiles
        elif mask is not None:
            raise ConfigError("a mask needs the image it edits: pass image= (tix generate --image) too")
        size = self.default_size if size is None else size
        height, width = (size, size) if isinstance(size, int) else size
        if height < self.vae_scale_factor or width < self.vae_scale_factor:
            raise ConfigError(f"size {height}x{width}: give a positive size in pixels, e.g. {self.default_size}")
        if not prompts:
            raise ConfigError("generate needs at least one prompt")
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ConfigError(f"size {height}x{width} must be a multiple of {self.vae_scale_factor} for this model")
        if isinstance(negative, str) or negative is None:
            negative = [negative or ""] * n
        mesh = mesh or parallel.make_mesh(jax.local_devices())
        per = parallel.batch_size_multiple(mesh)
        padded = -(-n // per) * per
        prompts = list(prompts) + [prompts[-1]] * (padded - n)
        negative = list(negative) + [negative[-1]] * (padded - n)
        ids = self.tokenize(prompts)
        neg_ids = self.tokenize(negative)
        zero_uncond = self.kind == "sdxl" and not any(negative)  # SDXL's force_zeros_for_empty_prompt
        shape = (padded, height // self.vae_scale_factor, width // self.vae_scale_factor, self.unet.config.in_channels)
        if latents is None:
            noise = np.asarray(jax.random.normal(jax.random.key(seed), shape, jnp.float32))
        else:
            noise = np.asarray(latents, np.float32)
            if noise.shape != (n, *shape[1:]):
                raise ConfigError(f"latents of shape {noise.shape} do not fit {n} prompt(s) at {height}x{width}: "
                                  f"expected {(n, *shape[1:])} (NHWC)")
            noise = np.concatenate([noise, np.repeat(noise[-1:], padded - n, axis=0)])
        inputs = {"ids": ids, "neg": neg_ids, "noise": noise}
        if samplers.is_stochastic(sampler):
            inputs["step_keys"] = step_keys(seed, padded)
        if image is not None:
            inputs["image"] = _pad_rows(image, padded)
            if mask is not None:
                inputs["mask"] = _pad_rows(latent_mask(mask, n, (height, width), self.vae_scale_factor), padded)
        batch = parallel.put_batch(inputs, mesh)
        params = parallel.put_replicated(self.params, mesh)
        img2img_strength = None if image is None else float(strength)
        fn = _jit_generate(self, sampler, steps, float(guidance), zero_uncond, (height, width), img2img_strength)
        images = fn(params, self.extras(), batch)
        return np.asarray(images)[:n]


def step_keys(seed: int, rows: int) -> np.ndarray:
    """The raw PRNG keys ([rows, ...] uint32) of a stochastic sampler's per-step noise for prompt rows 0..rows-1 of
    `seed`; row r's key depends on r alone, and it travels sharded with its row."""
    base = jax.random.fold_in(jax.random.key(seed), 1)  # the starting noise is drawn from key(seed) itself
    return np.asarray(jax.random.key_data(jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.arange(rows))))


def image_rows(image: Any, n: int) -> np.ndarray:
    """`image` as uint8 [n, H, W, 3]: one RGB image for every prompt, or one per prompt."""
    rows = np.asarray(image)
    if rows.ndim == 3:
        rows = rows[None]
    if rows.ndim != 4 or rows.shape[-1] != 3:
        raise ConfigError(f"image of shape {rows.shape}: expected RGB [H, W, 3] or one per prompt [B, H, W, 3]")
    if rows.dtype != np.uint8:
        raise ConfigError(f"image of dtype {rows.dtype}: expected uint8 pixels (0-255)")
    if rows.shape[0] not in (1, n):
        raise ConfigError(f"{rows.shape[0]} images for {n} prompts: give one image, or one per prompt")
    return np.broadcast_to(rows, (n, *rows.shape[1:]))


def latent_mask(mask: Any, n: int, size: tuple[int, int], factor: int) -> np.ndarray:
    """A pixel mask ([H, W] or [B, H, W], optionally with a trailing channel of 1) -> float32 [n, H/f, W/f, 1] in
    [0, 1], each latent cell the share of its f x f pixels to edit."""
    m = np.asarray(mask)
    if m.ndim in (3, 4) and m.shape[-1] == 1 and m.shape[-3:-1] == tuple(size):
        m = m[..., 0]
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or m.shape[1:] != tuple(size):
        raise ConfigError(f"mask of shape {np.shape(mask)} does not fit the {size[1]}x{size[0]} image; "
                          "give a single-channel mask of the image's size")
    if m.shape[0] not in (1, n):
        raise ConfigError(f"{m.shape[0]} masks for {n} prompts: give one mask, or one per prompt")
    if m.dtype == np.uint8:
        m = m / 255.0
    m = m.astype(np.float32)
    if m.min() < 0 or m.max() > 1:
        raise ConfigError(f"mask values span [{m.min()}, {m.max()}]: expected [0, 1] floats, bools or uint8")
    h, w = size[0] // factor, size[1] // factor
    cells = m.reshape(m.shape[0], h, factor, w, factor).mean(axis=(2, 4))
    return np.broadcast_to(cells[..., None], (n, h, w, 1))


def _pad_rows(rows: np.ndarray, padded: int) -> np.ndarray:
    return np.concatenate([rows, np.repeat(rows[-1:], padded - len(rows), axis=0)])


def default_time_ids(batch: int, size: tuple[int, int]) -> jax.Array:
    """SDXL's add_time_ids for an uncropped image generated at its original size."""
    h, w = size
    return jnp.tile(jnp.asarray([[h, w, 0, 0, h, w]], jnp.float32), (batch, 1))


def to_uint8(images: jax.Array) -> jax.Array:
    return jnp.round((jnp.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


def _token_pattern(name: str, whole_word: bool) -> str:
    """The regex matching where the tokenizer splits out added token `name` (see `_added_token`)."""
    return rf"(?<!\w){re.escape(name)}(?!\w)" if whole_word else re.escape(name)


def _whole_word(token: str) -> bool:
    # A token that starts or ends with a letter or digit ("hoto", "my-cat") would otherwise be split out of any word
    # containing it ("photo" -> "p" + "hoto"); bracketed tokens ("<my-cat>") keep matching anywhere, as in diffusers.
    return bool(re.match(r"\w", token[0]) or re.match(r"\w", token[-1]))


def _added_token(name: str, *, whole_word: bool) -> Any:
    """`name` as the tokenizer's added token; a whole-word one matches only between non-word characters."""
    from tokenizers import AddedToken

    return AddedToken(name, single_word=whole_word, normalized=True)


# Compiled entry points, cached on the model object per static settings (the params stay arguments). Living on the
# object, they go when it goes: a process that loads model after model keeps none of the old weights.
def _cache(fn):
    def get(sd: StableDiffusion, *static):
        key = (fn.__name__, *static)
        if key not in sd._compiled:
            sd._compiled[key] = jax.jit(partial(fn, sd, *static))
        return sd._compiled[key]

    return get


@_cache
def _jit_text(sd, params, ids, extra):
    return sd.text_fn(params, ids, extra)


@_cache
def _jit_unet(sd, params, latents, t, context, pooled, time_ids):
    return sd.unet_fn(params, latents, t, context, pooled, time_ids)


@_cache
def _jit_encode(sd, params, images):
    mean, _ = sd.encode_fn(params, images)
    return sd.scale_latents(mean)


@_cache
def _jit_decode(sd, params, latents):
    return sd.decode_fn(params, latents)


@_cache
def _jit_generate(sd, sampler, steps, guidance, zero_uncond, size, strength, params, extra, batch):
    context, pooled = sd.text_fn(params, batch["ids"], extra)
    if samplers.doubles_batch(guidance):
        if zero_uncond:
            neg_context, neg_pooled = jnp.zeros_like(context), None if pooled is None else jnp.zeros_like(pooled)
        else:
            neg_context, neg_pooled = sd.text_fn(params, batch["neg"], extra)
        context = jnp.concatenate([neg_context, context])
        pooled = None if pooled is None else jnp.concatenate([neg_pooled, pooled])
    time_ids = default_time_ids(context.shape[0], size) if sd.kind == "sdxl" else None

    def model_fn(latents, t):
        t = jnp.broadcast_to(t, (latents.shape[0],))
        return sd.unet_fn(params, latents, t, context, pooled, time_ids)

    init = None
    if "image" in batch:
        mean, _ = sd.encode_fn(params, batch["image"].astype(jnp.float32) / 127.5 - 1.0)
        init = sd.scale_latents(mean)
    keys = jax.random.wrap_key_data(batch["step_keys"]) if "step_keys" in batch else None
    latents = samplers.sample(
        model_fn, sd.schedule, sampler, steps, batch["noise"], guidance_scale=guidance,
        init=init, strength=1.0 if strength is None else strength, mask=batch.get("mask"), keys=keys,
    )
    return to_uint8(sd.decode_fn(params, latents))
