"""benchmarks/one_vector_optimum.py, whose figures the README quotes: the fixed draws cover every tenth alike, the
full-batch fit lowers the loss it fits (weighted or not), and its table reports each vector against the caption."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import tix
from benchmarks import one_vector_optimum as probe
from tix import schedule as sched
from train.step import diffusion_loss


def test_fixed_draws_cover_each_tenth_alike():
    draws = probe.fixed_draws(np.zeros((3, 4, 4, 4), np.float32), 5, 0, 1000)
    assert np.array_equal(np.bincount(draws.level), [5] * probe.LEVELS)
    np.testing.assert_array_equal(np.asarray(sched.level_of(draws.t, probe.LEVELS, 1000)), draws.level)
    again = probe.fixed_draws(np.zeros((3, 4, 4, 4), np.float32), 5, 0, 1000)
    assert np.array_equal(np.asarray(draws.noise), np.asarray(again.noise)) and draws.prompt == again.prompt


def test_the_fit_lowers_the_loss_it_fits(tiny_dirs):
    sd = tix.load(tiny_dirs("sd1"))
    sd.add_tokens(probe.PLACEHOLDER, [None])
    latents = np.asarray(jax.random.normal(jax.random.key(0), (2, 8, 8, 4)))
    draws = probe.fixed_draws(latents, 2, 0, sd.schedule.num_train_timesteps)
    loss = jax.jit(lambda v, x0, noise, t, ids: diffusion_loss(sd, sd.params, (v,), x0, noise, t, ids))
    start = np.asarray(jax.random.normal(jax.random.key(1), (1, sd.text[0].width))) * 0.1
    weight = jnp.linspace(0.0, 2.0, len(draws.prompt))  # the noisiest draws weigh most, the cleanest nothing
    plain, curve = probe.fit(sd, loss, start, draws, 30, 0.05)
    weighted, weighted_curve = probe.fit(sd, loss, start, draws, 30, 0.05, weight)
    assert curve[-1][1] < curve[0][1] and weighted_curve[-1][1] < weighted_curve[0][1]
    assert not np.allclose(plain, weighted)  # the weights steer the fit
    before = probe.loss_per_tenth(sd, loss, jnp.asarray(start), draws, probe.PLACEHOLDER)
    after = probe.loss_per_tenth(sd, loss, jnp.asarray(plain), draws, probe.PLACEHOLDER)
    assert after.mean() < before.mean()


def test_the_table_sets_each_vector_against_the_caption():
    caption = {"held": [1.0] * 10}
    fitted = {"held": [1.1] * 7 + [0.9] * 3, "curve": [(0, 2.0), (25, 1.5), (49, 1.4)], "norm": 2.0,
              "reconstruction": 0.5, "editability": 0.25}
    trained = {**fitted, "held": [1.0] * 10}
    del trained["curve"]
    lines = probe.table({"c": {"caption": caption, "fitted from w": fitted, "run": trained}}).splitlines()
    assert lines[2] == "| c | fitted from w | 1.40000, -1.0e-01 | 1.0400 | 0.900 | 2.00 | 0.50 | 0.25 |"
    assert lines[3] == "| c | run | - | 1.0000 | 1.000 | 2.00 | 0.50 | 0.25 |"
