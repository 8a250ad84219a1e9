"""The README's training claims, each checked where it is decided: the command line and config resolution for what
the user types, the optimizer and the step's pure functions for what they compute. Nothing here trains a model; the
runs that need one stop at the optimizer (`make_optimizer` is the first thing built after the config is resolved)."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

import train.invert as invert
from tests.test_variants import _stand_in_step
from tix import cli, templates
from tix.schedule import min_snr_weight
from train.config import TrainConfig, load_config
from train.data import concept_specs, crops, resolve_concept
from train.step import (
    StepConfig,
    Tables,
    TrainState,
    clip_per_concept,
    diffusion_loss,
    draw_batch,
    loss_fn,
    make_optimizer,
    train_step,
)

ROOT = Path(__file__).resolve().parent.parent


class _Stop(Exception):
    pass


@pytest.fixture
def captured(monkeypatch):
    """Runs `tix ...` in this process up to the optimizer: returns the resolved config and make_optimizer's
    arguments, without compiling or training."""
    seen = {}
    real_run = invert.run

    def run(cfg, *args, **kwargs):
        seen["cfg"] = cfg
        return real_run(cfg, *args, **kwargs)

    def optimizer(lr, steps, **kwargs):
        seen["optimizer"] = dict(lr=lr, steps=steps, **kwargs)
        raise _Stop

    monkeypatch.setattr(invert, "run", run)
    monkeypatch.setattr(invert, "make_optimizer", optimizer)

    def call(*argv):
        seen.clear()
        with pytest.raises(_Stop):
            cli.main(list(argv))
        return seen["cfg"], seen["optimizer"]

    return call


@pytest.fixture(scope="module")
def concept_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("concept") / "thing"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _invert(model, images, out, *extra):
    return ["invert", "--model", str(model), "--images", str(images), "--token", "<thing>", "--init", "cat",
            "--out", str(out), *extra]


def test_lr_is_scaled_by_batch_and_accumulation_unless_no_scale_lr(captured, tiny_dirs, concept_dir, tmp_path):
    model = tiny_dirs("sd1")
    cfg, opt = captured(*_invert(model, concept_dir, tmp_path / "a", "--lr", "1e-3", "--batch-size", "3",
                                 "--set", "grad_accum=2"))
    assert cfg.scale_lr and opt["lr"] == pytest.approx(1e-3 * 3 * 2)
    _, opt = captured(*_invert(model, concept_dir, tmp_path / "b", "--lr", "1e-3", "--batch-size", "3",
                               "--set", "grad_accum=2", "--no-scale-lr"))
    assert opt["lr"] == pytest.approx(1e-3)
    # The defaults: 5e-4 x batch 4, constant, no warmup, AdamW (0.9, 0.999, 1e-8) with decay 1e-2, no clipping.
    _, opt = captured(*_invert(model, concept_dir, tmp_path / "c"))
    assert opt == dict(lr=pytest.approx(5e-4 * 4), steps=3000, schedule="constant", warmup=0, weight_decay=1e-2,
                       b1=0.9, b2=0.999, eps=1e-8, max_grad_norm=None)
    _, opt = captured(*_invert(model, concept_dir, tmp_path / "d", "--set", "lr_schedule=cosine",
                               "--set", "warmup_steps=10", "--set", "max_grad_norm=1.0"))
    assert (opt["schedule"], opt["warmup"], opt["max_grad_norm"]) == ("cosine", 10, 1.0)


def test_config_file_then_flags_then_set(captured, tiny_dirs, concept_dir, tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text(f"model: {tiny_dirs('sd1')}\nsteps: 77\nbatch_size: 2\nlr: 1.0e-3\nflip_p: 0.25\n")
    cfg, opt = captured("invert", "--config", str(preset), "--images", str(concept_dir), "--token", "<thing>",
                        "--init", "cat", "--out", str(tmp_path / "r"), "--batch-size", "3", "--set", "flip_p=0.0")
    assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.flip_p) == (77, 3, 1e-3, 0.0)  # file, flag over file, --set
    assert opt["steps"] == 77 and opt["lr"] == pytest.approx(1e-3 * 3)
    # Every shipped preset resolves to a valid config.
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path, {"images": str(concept_dir), "token": "<t>"}).check()


def _constant_gradient_lrs(optimizer, steps):
    """The learning rate of each step, read off AdamW: with a constant gradient and no decay its step is lr x 1."""
    params = (jnp.zeros((1, 1, 1)),)
    grads = (jnp.ones((1, 1, 1)),)
    state = optimizer.init(params)
    out = []
    for _ in range(steps):
        updates, state = optimizer.update(grads, state, params)
        out.append(-float(updates[0].ravel()[0]))
    return np.array(out)


def test_schedules_constant_warmup_and_cosine():
    lr, steps, warmup = 1e-2, 20, 5
    constant = _constant_gradient_lrs(make_optimizer(lr, steps, weight_decay=0.0), steps)
    np.testing.assert_allclose(constant, lr, rtol=1e-4)  # Adam's float32 bias corrections cost ~1e-5
    warm = _constant_gradient_lrs(make_optimizer(lr, steps, warmup=warmup, weight_decay=0.0), steps)
    np.testing.assert_allclose(warm, [lr * min(t, warmup) / warmup for t in range(steps)], rtol=1e-4, atol=1e-12)
    cosine = _constant_gradient_lrs(make_optimizer(lr, steps, schedule="cosine", warmup=warmup, weight_decay=0.0),
                                    steps)
    want = [lr * t / warmup if t < warmup else lr * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (steps - warmup)))
            for t in range(steps)]
    np.testing.assert_allclose(cosine, want, rtol=1e-4, atol=1e-9)


def test_adamw_decays_only_the_learned_vectors():
    lr, wd = 1e-2, 1e-2
    vectors = (jnp.full((2, 1, 4), 3.0), jnp.full((2, 1, 6), -2.0))
    optimizer = make_optimizer(lr, 10, weight_decay=wd)
    zero = jax.tree.map(jnp.zeros_like, vectors)
    updates, _ = optimizer.update(zero, optimizer.init(vectors), vectors)
    # No gradient: Adam's step is 0, decoupled decay alone shrinks the vectors by lr x wd.
    for u, v in zip(updates, vectors, strict=True):
        np.testing.assert_allclose(u, -lr * wd * v, rtol=1e-6)
    # The optimizer state holds moments for exactly the vectors: no frozen weight is a parameter.
    sizes = sum(x.size for x in jax.tree.leaves(optimizer.init(vectors)) if np.ndim(x) > 0)
    assert sizes == 2 * sum(v.size for v in vectors)


def test_gradient_clipping_is_per_concept_over_every_encoder():
    # Concept 0: rows of norm 3 and 4 in the two encoders (norm 5 together); concept 1: norm 0.5 in total.
    g = (jnp.array([[[3.0, 0.0]], [[0.3, 0.0]]]), jnp.array([[[0.0, 4.0, 0.0]], [[0.0, 0.4, 0.0]]]))
    clipped, _ = clip_per_concept(1.0).update(g, optax.EmptyState())
    np.testing.assert_allclose(clipped[0][0], g[0][0] / 5, rtol=1e-6)
    np.testing.assert_allclose(clipped[1][0], g[1][0] / 5, rtol=1e-6)
    np.testing.assert_array_equal(clipped[0][1], g[0][1])  # under the limit: untouched, whatever concept 0 did
    np.testing.assert_array_equal(clipped[1][1], g[1][1])


def test_paper_templates_style_and_default_init(captured, tiny_dirs, concept_dir, tmp_path):
    assert len(templates.OBJECT) == 27 and len(templates.STYLE) == 19
    assert all(t.count("{}") == 1 for t in templates.OBJECT + templates.STYLE)
    cfg, _ = captured("invert", "--model", str(tiny_dirs("sd1")), "--images", str(concept_dir), "--token", "<s>",
                      "--out", str(tmp_path / "s"), "--style")
    assert cfg.style and cfg.init is None
    style = resolve_concept(concept_specs(cfg)[0], cfg)
    assert style.prompts == templates.STYLE and style.init == "painting"
    plain = TrainConfig(images=str(concept_dir), token="<o>")
    thing = resolve_concept(concept_specs(plain)[0], plain)
    assert thing.prompts == templates.OBJECT and thing.init == "sculpture" and thing.vectors == 1


def test_concept_yaml_overrides_and_captions(tmp_path, concept_dir):
    root = tmp_path / "concepts"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for f in concept_dir.iterdir():
            (root / name / f.name).write_bytes(f.read_bytes())
    (root / "a" / "concept.yaml").write_text(
        'init: cat\nvectors: 2\nstyle: true\ncaptions: ["a photo of {} on a sofa", "a close-up of {}"]\n')
    cfg = TrainConfig(concepts=str(root), init="dog")
    a, b = (resolve_concept(s, cfg) for s in concept_specs(cfg))
    assert (a.token, a.init, a.vectors, a.style) == ("<a>", "cat", 2, True)
    assert a.prompts == ("a photo of {} on a sofa", "a close-up of {}") and not a.per_image_captions
    assert (b.token, b.init, b.vectors, b.style, b.prompts) == ("<b>", "dog", 1, False, templates.OBJECT)
    # Per-image captions: img.txt beside each image, the token written out.
    for i, f in enumerate(sorted(p for p in (root / "b").iterdir() if p.suffix == ".png")):
        f.with_suffix(".txt").write_text(f"<b> number {i} on a table")
    b = resolve_concept(concept_specs(cfg)[1], cfg)
    assert b.per_image_captions and sorted(b.prompts) == ["{} number 0 on a table", "{} number 1 on a table"]


def test_centre_crop():
    # A 60 x 30 image whose columns are numbered: the centre crop of 30 px keeps columns 15..44.
    columns = np.tile(np.arange(60, dtype=np.uint8)[None, :, None] * 4, (30, 1, 3))
    (crop,) = crops(Image.fromarray(columns), 30, center=True, count=1, rng=np.random.default_rng(0))
    np.testing.assert_allclose((crop[0, :, 0] + 1) * 127.5 / 4, np.arange(15, 45), atol=1e-4)


def _view_tables(flip_p_images=1, views=2):
    """Tables whose latents hold their own view index, to read which view each draw took."""
    mean = np.broadcast_to(np.arange(views, dtype=np.float32)[None, None, :, None, None, None],
                           (1, flip_p_images, views, 1, 1, 1)).copy()
    ids = np.zeros((1, 1, 77), np.int32)
    return Tables(mean, np.zeros_like(mean), np.array([1], np.int32), np.array([views // 2], np.int32), (ids,),
                  np.array([1], np.int32), np.array([False]), np.array([7], np.uint32), np.array([1.0], np.float32))


@pytest.mark.parametrize("flip_p", [0.0, 0.5, 1.0])
def test_horizontal_flip_probability(flip_p):
    tables = _view_tables()
    cfg = StepConfig(1000, 1, flip_p, None, None, 8)
    latents, *_ = draw_batch(tables, cfg, 1000, 3)
    flipped = float(np.mean(np.asarray(latents)[:, 0, 0, 0]))  # view 1 is the mirror image
    assert abs(flipped - flip_p) < 0.05, flipped


def test_timestep_bias_shifts_the_steps_draws_toward_noise():
    tables = _view_tables()
    means = {}
    for bias in (0.0, 1.0):
        cfg = StepConfig(4000, 1, 0.5, None, None, 8, timestep_bias=bias)
        _, _, t, _ = draw_batch(tables, cfg, 1000, 3)
        means[bias] = float(np.mean(np.asarray(t)))
    # Uniform draws average T/2; density ~ t/T averages 2T/3.
    assert means[0.0] == pytest.approx(500, abs=15) and means[1.0] == pytest.approx(667, abs=15), means


def test_min_snr_gamma_weights_the_per_sample_loss():
    sd, cfg, tables, vectors = _stand_in_step()  # a linear stand-in for the model: the loss's wiring is under test
    gamma = 5.0
    cfg = cfg._replace(batch_size=32, min_snr_gamma=gamma)
    params = {"table": sd.table}
    _, per_concept = loss_fn(vectors, sd, cfg, params, tables, 11)
    latents, noise, t, ids = draw_batch(tables, cfg, sd.schedule.num_train_timesteps, 11)
    rows = tuple(v.reshape(-1, v.shape[-1]) for v in vectors)
    plain = diffusion_loss(sd, params, rows, sd.scale_latents(latents), noise, t, ids)
    weight = min_snr_weight(sd.schedule, t, gamma)
    assert float(jnp.min(weight)) < 0.9  # some draws are weighted down (else nothing is tested)
    want = jnp.mean((plain * weight).reshape(per_concept.shape[0], -1), axis=1)
    np.testing.assert_allclose(per_concept, want, rtol=1e-5)


def test_gradient_accumulation_averages_micro_batches():
    sd, cfg, tables, vectors = _stand_in_step()
    cfg = cfg._replace(grad_accum=2)
    params = {"table": sd.table}
    sgd = optax.sgd(1.0)  # the update is minus the gradient it is given
    state = TrainState(vectors, sgd.init(vectors), jnp.zeros((), jnp.int32))
    new, _ = train_step(sd, cfg, sgd, state, params, tables)
    grad = jax.grad(lambda v, k: loss_fn(v, sd, cfg, params, tables, k)[0])
    # Step 0 with two micro-batches draws at keys 0 and 1; the step applies their mean gradient.
    g0, g1 = grad(vectors, 0), grad(vectors, 1)
    np.testing.assert_allclose(new.vectors[0], vectors[0] - (g0[0] + g1[0]) / 2, rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(g0[0] - g1[0]).max()) > 1e-4  # the micro-batches differ: the mean is not one of them
