"""benchmarks/toyworld_pick.py: the fixed-draw loss it picks runs by prefers the vector that matches the images, and
runs that drew different concepts are refused, since the README quotes its table."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import tix
from benchmarks import toyworld_pick as pick
from tix.models.clip import token_table
from tix.toyworld import world


def test_the_fixed_draw_loss_prefers_the_word_the_images_show(tmp_path):
    sd = tix.load("toyworld")
    sd.add_tokens(pick.PLACEHOLDER, [None])
    concept = world.Concept("red_solid_circle", {"shape": "circle", "colour": "red", "pattern": "solid"})
    for i, image in enumerate(world.concept_images(concept, 3, seed=0)):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    x0 = pick.training_latents(sd, tmp_path)
    assert x0.shape[0] == 6  # the images and their mirror images
    table = np.asarray(token_table(sd.params[sd.text[0].name]), np.float32)
    side = sd.text[0].name

    def row(word: str) -> dict:
        return {side: table[sd.tokenize([word])[0][0, 1]][None]}

    losses = pick.candidate_losses(sd, [row("blue"), row("red"), row("blue")], x0, ["a {} solid circle"], repeats=1)
    assert losses[1] < losses[0] and losses[0] == pytest.approx(losses[2], abs=1e-6)  # same draws for every candidate


def test_every_tenth_of_the_schedule_is_drawn():
    sd = tix.load("toyworld")
    _, _, t = pick.fixed_draws(sd, np.zeros((2, 4, 4, 4), np.float32), repeats=3)
    t = np.asarray(t)
    assert t.shape == (2 * 3 * pick.BUCKETS,) and t.min() >= 0 and t.max() < 1000
    assert sorted(set((t // 100).tolist())) == list(range(pick.BUCKETS))


def test_runs_of_different_draws_are_refused(tmp_path, capsys):
    for name, seed in (("a", "2"), ("b", "3")):
        (tmp_path / name / "runs" / "base" / "tokens").mkdir(parents=True)
        (tmp_path / name / "results.json").write_text(json.dumps(
            {"args": {"model": "toyworld", "draw": "32", "seed": seed, "images": "5"}, "per_concept": {}}))
    with pytest.raises(SystemExit):
        pick.main([str(tmp_path / "a"), str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert "drew different concepts or images" in err and "(seed differ)" in err
