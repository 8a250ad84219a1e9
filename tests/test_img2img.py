"""Image-to-image and masked edits: the sampler loop against diffusers' schedulers, the whole pipeline against
diffusers' img2img and (4-channel) inpainting pipelines on the same noise, and a masked edit on the toy world."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import tix
from tests.test_samplers import keyed_noise, oracle, tix_step_noise
from tests.test_schedule import SD1, SD2, SDXL
from tix import cli, samplers
from tix.errors import ConfigError
from tix.schedule import NoiseSchedule


def _nchw(x):
    return torch.from_numpy(np.asarray(x, np.float32)).permute(0, 3, 1, 2)


def _nhwc(x):
    return x.permute(0, 2, 3, 1).numpy()


def _model(x, t):
    """A stand-in model whose output depends on the latents and the timestep, the same in numpy, torch and jax."""
    return 0.3 * x + 0.2 * (t.reshape(-1, 1, 1, 1) / 1000.0) - 0.1


def _diffusers_loop(config, sampler, n, strength, x0, noise, mask):
    """diffusers' img2img loop (get_timesteps, add_noise at the first kept timestep), and with a mask the blending
    of its inpainting pipeline for a 4-channel UNet."""
    sched = oracle(config, sampler)
    sched.set_timesteps(n)
    kept = min(int(n * strength), n)
    start = n - kept
    timesteps = sched.timesteps[start:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)
    x0_t, noise_t = _nchw(x0), _nchw(noise)
    x = sched.add_noise(x0_t, noise_t, timesteps[:1])
    for i, t in enumerate(timesteps):
        x_in = sched.scale_model_input(x, t)
        out = _model(x_in, t.float().reshape(1))
        x = sched.step(out, t, x).prev_sample
        if mask is not None:
            known = x0_t if i == len(timesteps) - 1 else sched.add_noise(x0_t, noise_t, timesteps[i + 1:i + 2])
            x = (1 - _nchw(mask)) * known + _nchw(mask) * x
    return _nhwc(x), len(timesteps)


CASES = [(name, sampler) for name in ("sd1", "sd2", "sdxl") for sampler in samplers.SAMPLERS]


@pytest.mark.parametrize("config_name, sampler", CASES)
@pytest.mark.parametrize("n, strength", [(10, 0.55), (20, 0.8)])
@pytest.mark.parametrize("masked", [False, True])
def test_img2img_loop_matches_diffusers(config_name, sampler, n, strength, masked):
    config = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL}[config_name]
    rng = np.random.default_rng(n)
    x0 = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    noise = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    mask = (rng.uniform(size=(2, 4, 4, 1)) > 0.5).astype(np.float32) if masked else None
    keys = jax.random.split(jax.random.key(n), 2)
    with tix_step_noise(keyed_noise(keys)):
        want, ran = _diffusers_loop(config, sampler, n, strength, x0, noise, mask)
    calls = []

    def model_fn(x, t):
        calls.append(t)
        return _model(x, t)

    got = samplers.sample(model_fn, NoiseSchedule.from_diffusers(config), sampler, n, jnp.asarray(noise),
                          init=jnp.asarray(x0), strength=strength, mask=None if mask is None else jnp.asarray(mask),
                          keys=keys)
    assert samplers.make_table(NoiseSchedule.from_diffusers(config), sampler, n).num_steps - \
        samplers.start_step(n, strength) == ran
    err = float(np.abs(np.asarray(got) - want).max())
    assert err < 2e-5, err
    if masked:  # the kept part ends as the source itself
        np.testing.assert_allclose(np.asarray(got) * (1 - mask), x0 * (1 - mask), atol=1e-6)


def test_start_step_is_diffusers_get_timesteps():
    for n in (1, 3, 10, 25, 50):
        for strength in (0.05, 0.3, 0.5, 0.7, 0.75, 0.99, 1.0):
            kept = min(int(n * strength), n)
            if kept == 0:
                with pytest.raises(ConfigError, match="runs no step"):
                    samplers.start_step(n, strength)
            else:
                assert samplers.start_step(n, strength) == n - kept
    for bad in (-0.1, 1.5, "0.5", True):
        with pytest.raises(ConfigError, match="strength"):
            samplers.start_step(10, bad)


# ---- the whole pipeline against diffusers, on the same noise ----------------------------------------------------


def _same_noise(monkeypatch, module, seed):
    """Make a diffusers pipeline module draw tix's noise for `seed`, and encode images to the VAE's mean as tix does
    (diffusers samples the latent distribution)."""
    from diffusers.models.autoencoders import vae

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        b, c, h, w = shape
        return _nchw(jax.random.normal(jax.random.key(seed), (b, h, w, c), jnp.float32)).to(dtype)

    monkeypatch.setattr(module, "randn_tensor", randn_tensor)
    monkeypatch.setattr(vae.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


def _source(seed=0, size=32):
    """A smooth picture with structure at several scales (a random image would be noise to the VAE)."""
    y, x = np.mgrid[:size, :size] / size
    rgb = np.stack([np.sin(6 * x + seed), np.cos(5 * y - 2 * x), np.sin(9 * x * y + 1)], -1)
    return np.round((rgb * 0.45 + 0.5) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def sd1(tiny_dirs):
    from diffusers import StableDiffusionPipeline

    folder = tiny_dirs("sd1")
    return tix.load(folder), StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)


PROMPTS = ["a photo of a red cat", "a blue dog on a green background"]


def test_img2img_matches_diffusers_pipeline(sd1, monkeypatch):
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as module

    sd, pipe = sd1
    image = _source()
    got = sd.generate(PROMPTS, steps=10, guidance=7.5, sampler="dpm++2m", seed=3, image=image, strength=0.6)
    _same_noise(monkeypatch, module, seed=3)
    ref = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    ref.scheduler = oracle(pipe.scheduler.config, "dpm++2m")
    want = ref(PROMPTS, image=Image.fromarray(image), strength=0.6, num_inference_steps=10, guidance_scale=7.5,
               output_type="np").images
    want = np.round(want * 255).astype(np.uint8)
    diff = np.abs(got.astype(int) - want).max()
    print(f"img2img vs diffusers (tiny SD1, dpm++2m, 10 steps, strength 0.6): max uint8 difference {diff}")
    assert got.shape == want.shape == (2, 32, 32, 3)
    assert diff <= 2
    assert np.abs(got.astype(int) - image).mean() > 1  # it did change the picture


def test_masked_edit_matches_diffusers_inpainting(sd1, monkeypatch):
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as module

    sd, pipe = sd1
    image = _source(seed=1)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 4:20] = 255  # on latent-cell edges (factor 2), where tix's area average equals diffusers' nearest
    got = sd.generate(PROMPTS, steps=8, guidance=7.5, sampler="ddim", seed=5, image=image, strength=0.75,
                      mask=mask)
    _same_noise(monkeypatch, module, seed=5)
    ref = StableDiffusionInpaintPipeline.from_pipe(pipe)
    want = ref(PROMPTS, image=Image.fromarray(image), mask_image=Image.fromarray(mask), strength=0.75,
               num_inference_steps=8, guidance_scale=7.5, output_type="np").images
    want = np.round(want * 255).astype(np.uint8)
    diff = np.abs(got.astype(int) - want).max()
    print(f"masked edit vs diffusers inpainting (tiny SD1, ddim, 8 steps, strength 0.75): max uint8 diff {diff}")
    assert diff <= 2


# ---- the toy world: the edit obeys the prompt inside the mask and leaves the rest alone ---------------------------


def test_masked_edit_on_the_toy_world():
    from tix.toyworld import scorer, world

    sd = tix.load("toyworld")
    rng = np.random.default_rng(0)
    colours, shapes = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle", "star"]
    scenes, prompts, masks = [], [], []
    for k in range(8):  # two of each: a single sample per shape reads the model's luck more than the edit
        scene = world.sample_scene(rng, shape=shapes[k % 4], colour=colours[k % 4], pattern="solid",
                                   background="white", size="small")
        scenes.append(scene)
        # Another colour and another background: the background must not follow the prompt outside the mask.
        prompts.append(f"a {colours[(k + 1) % 4]} {shapes[k % 4]} on a {['green', 'blue', 'gray', 'blue'][k % 4]} "
                       "background")
        box = np.zeros((32, 32), np.float32)  # the object's bounding box, 2 px wider each side
        half = scene.scale / 2
        (y0, y1), (x0, x1) = [(int(np.floor((c - half) * 32)) - 2, int(np.ceil((c + half) * 32)) + 2)
                              for c in (scene.y, scene.x)]
        box[max(y0, 0):y1, max(x0, 0):x1] = 1
        masks.append(box)
    source, masks = world.render_many(scenes), np.stack(masks)
    # The same edits unmasked (a mask of ones, so the same compiled program): how far the prompt alone moves the
    # pixels outside each box. The VAE decoder's receptive field lets what is drawn inside tint the whole image a
    # little, so the masked edit is measured against that, not against zero.
    # Guidance 3: at 7.5 the toy model, made to draw inside a box it did not choose, overshoots (latents far off its
    # range) and the VAE decoder's receptive field carries that past the box into the kept background.
    both = sd.generate(prompts * 2, steps=20, guidance=3.0, seed=0, image=np.concatenate([source, source]),
                       strength=1.0, mask=np.concatenate([masks, np.ones_like(masks)]))
    edited, unmasked = both[:8], both[8:]
    outside = [(np.abs(img.astype(float) - source).mean(-1) * (1 - masks)).sum() / (1 - masks).sum()
               for img in (edited, unmasked)]
    inside = (np.abs(edited.astype(float) - source).mean(-1) * masks).sum() / masks.sum()
    scored = scorer.score(edited)
    asked = [p.split()[1:3] for p in prompts]
    obeyed = sum([s["colour"], s["shape"]] == a for s, a in zip(scored, asked, strict=True))
    print(f"toy-world masked edit: mean change inside {inside:.1f}, outside {outside[0]:.1f} levels (unmasked: "
          f"{outside[1]:.1f}); {obeyed}/8 draw the prompt's colour and shape")
    assert outside[0] < 0.5 * outside[1] and outside[0] < 0.5 * inside
    assert obeyed >= 5


# ---- errors and the CLI -------------------------------------------------------------------------------------------


def test_bad_edit_inputs_are_named_before_compiling(sd1):
    sd, _ = sd1
    image = _source()
    cases = [
        (dict(mask=np.ones((32, 32))), "needs the image"),
        (dict(image=image, strength=0.05), "runs no step"),
        (dict(image=image, strength=2.0), "between 0 and 1"),
        (dict(image=image.astype(np.float32)), "uint8"),
        (dict(image=image[..., :1]), "RGB"),
        (dict(image=image, size=64), "differs from the image"),
        (dict(image=image[:31, :31]), "multiple of 2"),
        (dict(image=np.stack([image] * 3)), "3 images for 2 prompts"),
        (dict(image=image, mask=np.ones((16, 16))), "does not fit"),
        (dict(image=image, mask=np.full((32, 32), 2.0)), r"expected \[0, 1\]"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            sd.generate(PROMPTS, steps=10, **kwargs)


def test_cli_reads_image_and_mask(tiny_dirs, tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_generate(self, prompts, **kwargs):
        seen.update(kwargs)
        return np.zeros((len(prompts), 32, 32, 3), np.uint8)

    monkeypatch.setattr(tix.StableDiffusion, "generate", fake_generate)
    Image.fromarray(_source(size=35)).save(tmp_path / "in.png")  # cut down to 34, a multiple of the VAE factor 2
    Image.fromarray(np.full((10, 10), 255, np.uint8)).convert("RGB").save(tmp_path / "mask.png")
    base = ["generate", "--model", str(tiny_dirs("sd1")), "--prompt", "a cat", "--n", "1", "--out", str(tmp_path)]
    cli.main([*base, "--image", str(tmp_path / "in.png"), "--strength", "0.4", "--mask", str(tmp_path / "mask.png")])
    assert seen["image"].shape == (34, 34, 3) and seen["image"].dtype == np.uint8
    assert seen["mask"].shape == (34, 34) and seen["mask"].min() == 255
    assert seen["strength"] == 0.4 and seen["size"] is None
    seen.clear()
    cli.main([*base, "--image", str(tmp_path / "in.png"), "--size", "16"])
    assert seen["image"].shape == (16, 16, 3) and "mask" not in seen
    for args, message in [(["--mask", str(tmp_path / "mask.png")], "--mask needs the image"),
                          (["--image", str(tmp_path / "missing.png")], "cannot read it as an image")]:
        with pytest.raises(SystemExit) as stop:
            cli.main([*base, *args])
        assert stop.value.code == 2 and message in capsys.readouterr().err
