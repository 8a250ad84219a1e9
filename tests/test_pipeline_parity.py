"""`sd.generate` against diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline: the same folder, the same
initial latents (`latents=`), each sampler as the matching diffusers scheduler, with and without guidance and
negative prompts (the stochastic ones fed tix's per-step noise). The images must agree within a few uint8 levels."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import tix
from tests.test_samplers import keyed_noise, oracle, tix_step_noise
from tix.errors import ConfigError
from tix.pipeline import step_keys
from tix.sampler_names import SAMPLERS

PROMPTS = ["a red cat on a green background", "a small blue dog"]
STEPS = 6
MAX_LEVELS = 2  # uint8 levels


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def pair(request, tiny_dirs):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = tiny_dirs(request.param)
    cls = StableDiffusionXLPipeline if request.param == "sdxl" else StableDiffusionPipeline
    return tix.load(folder), cls.from_pretrained(folder, torch_dtype=torch.float32)


# (guidance, negative prompts): guided with a negative prompt next to an empty one; unguided (one UNet row per image);
# guided with no negative prompt at all (SDXL then zeroes the unconditional embedding). Each family pairs every
# sampler with one mode, rotated so that over the three families every sampler meets every mode (24 compiles, not 72).
MODES = [(7.5, ["", "a blurry photo"]), (1.0, None), (5.0, None)]
KINDS = ("sd1", "sd2", "sdxl")


def test_generate_matches_diffusers_pipeline(pair):
    sd, pipe = pair
    size = sd.default_size
    latent = size // sd.vae_scale_factor
    noise = np.random.default_rng(0).standard_normal((len(PROMPTS), latent, latent, 4)).astype(np.float32)
    base_config = dict(pipe.scheduler.config)
    shift = KINDS.index(sd.kind)
    images = {}
    for i, sampler in enumerate(SAMPLERS):
        guidance, negative = MODES[(i + shift) % len(MODES)]
        got = sd.generate(PROMPTS, negative=negative, steps=STEPS, guidance=guidance, sampler=sampler,
                          size=size, latents=noise)
        pipe.scheduler = oracle(base_config, sampler)
        with torch.no_grad(), tix_step_noise(keyed_noise(jax.random.wrap_key_data(step_keys(0, len(PROMPTS))))):
            ref = pipe(PROMPTS, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=guidance,
                       height=size, width=size, latents=torch.from_numpy(noise).permute(0, 3, 1, 2),
                       output_type="np").images
        want = np.round(ref * 255).astype(np.int32)
        levels = int(np.abs(got.astype(np.int32) - want).max())
        print(f"{sd.kind} {sampler} guidance {guidance} negative {negative}: max {levels} uint8 levels")
        assert got.shape == want.shape
        assert levels <= MAX_LEVELS, (sampler, guidance, negative, levels)
        images[sampler] = got, guidance, negative
    # The latents replace the seed's noise: another seed changes nothing, other latents change the images.
    got, guidance, negative = images["ddim"]
    again = sd.generate(PROMPTS, negative=negative, steps=STEPS, guidance=guidance, sampler="ddim", size=size,
                        latents=noise, seed=5)
    np.testing.assert_array_equal(again, got)
    other = sd.generate(PROMPTS, negative=negative, steps=STEPS, guidance=guidance, sampler="ddim", size=size,
                        latents=noise[::-1])
    assert np.abs(again.astype(int) - other.astype(int)).max() > 0
    # Euler ancestral's fresh noise at every step comes from the seed, latents given or not.
    got, guidance, negative = images["euler-ancestral"]
    reseeded = sd.generate(PROMPTS, negative=negative, steps=STEPS, guidance=guidance, sampler="euler-ancestral",
                           size=size, latents=noise, seed=5)
    assert np.abs(reseeded.astype(int) - got.astype(int)).max() > 0


def test_latents_of_the_wrong_shape_are_refused(pair):
    sd, _ = pair
    with pytest.raises(ConfigError, match="latents of shape"):
        sd.generate(PROMPTS, latents=np.zeros((1, 4, 4, 4), np.float32), steps=1)
