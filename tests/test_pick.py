"""`tix pick` (train/pick.py): the fixed-draw loss prefers the vector that matches the images, whatever the chunking,
and the command keeps each concept's better run, writes what it picked, and refuses runs it cannot compare without
touching them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import tix
from tix import cli, embedding_files
from tix.embedding_files import Concept as Embedding
from tix.models.clip import token_table
from tix.toyworld import world
from train import pick
from train.config import TrainConfig

CONCEPT = world.Concept("red_solid_circle", {"shape": "circle", "colour": "red", "pattern": "solid"})
TOKEN = "<red-thing>"


@pytest.fixture(scope="module")
def words():
    """The toy model's rows for 'red' and 'blue', as one-vector embeddings of TOKEN."""
    sd = tix.load("toyworld")
    side = sd.text[0]
    table = np.asarray(token_table(sd.params[side.name]), np.float32)
    return {w: Embedding(TOKEN, {side.name: table[sd.tokenize([w])[0][0, 1]][None]}) for w in ("red", "blue")}


def _images(folder, seed=0):
    folder.mkdir(parents=True)
    for i, image in enumerate(world.concept_images(CONCEPT, 3, seed=seed)):
        Image.fromarray(image).save(folder / f"{i}.png")
    return folder


def _run(folder, images, embedding, **fields):
    """A finished run folder as `tix invert` leaves it: config.yaml and its export."""
    folder.mkdir(parents=True)
    cfg = TrainConfig(model="toyworld", images=str(images), token=TOKEN, out=str(folder), prompts=("a {} circle",),
                      **fields)
    (folder / "config.yaml").write_text(cfg.to_yaml())
    embedding_files.write(embedding, folder / "learned_embeds.safetensors", format="diffusers")
    return folder


def test_the_fixed_draw_loss_prefers_the_word_the_images_show(words, monkeypatch):
    sd = tix.load("toyworld")
    pixels = np.stack([np.asarray(im, np.float32) / 127.5 - 1 for im in world.concept_images(CONCEPT, 3, seed=0)])
    latents = np.asarray(sd.encode_images(pixels))
    candidates = [words["blue"], words["red"], words["blue"]]
    names = pick.add_placeholders(sd, candidates)
    losses = pick.candidate_losses(sd, names, candidates, latents, ["a {} solid circle"], repeats=1, seed=0)
    assert losses[1] < losses[0] - 0.002 and losses[0] == pytest.approx(losses[2], rel=1e-6)
    monkeypatch.setattr(pick, "CHUNK", 7)  # the draws are the same however they are chunked
    again = pick.candidate_losses(sd, names, candidates[:2], latents, ["a {} solid circle"], repeats=1, seed=0)
    np.testing.assert_allclose(again, losses[:2], rtol=1e-5)


def test_every_tenth_of_the_schedule_is_drawn():
    t = np.asarray(pick.fixed_timesteps(tix.load("toyworld").schedule, 6, pick.jax.random.key(0)))
    assert t.shape == (6 * pick.BUCKETS,) and t.min() >= 0 and t.max() < 1000
    assert (t // 100).tolist() == [b for b in range(pick.BUCKETS) for _ in range(6)]


def test_pick_keeps_the_better_run_and_refuses_what_it_cannot_compare(words, tmp_path, capsys, caplog):
    images = _images(tmp_path / "images")
    blue = _run(tmp_path / "blue", images, words["blue"])
    red = _run(tmp_path / "red", images, words["red"], timestep_bias=1.0)
    with caplog.at_level("WARNING", logger="tix"):
        cli.main(["pick", str(blue), str(red), "--out", str(tmp_path / "picked"), "--repeats", "1"])
    assert f"{TOKEN}: {red}" in capsys.readouterr().out
    assert any("differ in timestep_bias (0.0, 1.0)" in r.getMessage() for r in caplog.records)
    (kept,) = embedding_files.read(tmp_path / "picked" / "learned_embeds.safetensors")
    np.testing.assert_array_equal(kept.vectors["text_encoder"], words["red"].vectors["text_encoder"])
    summary = json.loads((tmp_path / "picked" / "pick.json").read_text())
    assert summary["concepts"][TOKEN]["picked"] == str(red)
    losses = summary["concepts"][TOKEN]["losses"]
    assert losses[str(red)] < losses[str(blue)]

    other = _run(tmp_path / "other", _images(tmp_path / "other-images", seed=1), words["red"])
    before = (blue / "learned_embeds.safetensors").read_bytes()
    for argv, message in (
        ([blue, red, "--out", tmp_path / "picked"], "is not an empty folder"),
        ([blue, red, "--out", red], "is one of the runs"),
        ([blue, other, "--out", tmp_path / "o1"], "different images"),
        ([blue, images, "--out", tmp_path / "o2"], "not a tix run folder"),
        ([blue, "--out", tmp_path / "o3"], "at least two run folders"),
    ):
        with pytest.raises(SystemExit):
            cli.main(["pick", *map(str, argv)])
        assert message in capsys.readouterr().err
    assert (blue / "learned_embeds.safetensors").read_bytes() == before
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


def test_pick_reads_every_text_encoder_and_tokens_of_several_vectors(tiny_dirs, tmp_path):
    model = tiny_dirs("sdxl")
    sd = tix.load(model)
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (sd.default_size, sd.default_size, 3), np.uint8)).save(images / f"{i}.png")

    def vectors(n: int, seed: int) -> dict:
        r = np.random.default_rng(seed)
        return {side.name: r.normal(0, 0.5, (n, side.width)).astype(np.float32) for side in sd.text}

    two = vectors(2, 1)
    second_changed = {**two, "text_encoder_2": vectors(2, 2)["text_encoder_2"]}
    runs = []
    for name, v in (("two", two), ("same", two), ("second", second_changed), ("one", vectors(1, 3))):
        folder = tmp_path / name
        folder.mkdir()
        cfg = TrainConfig(model=str(model), images=str(images), token=TOKEN, out=str(folder))
        (folder / "config.yaml").write_text(cfg.to_yaml())
        embedding_files.write(Embedding(TOKEN, v), folder / "learned_embeds.safetensors", format="diffusers")
        runs.append(str(folder))
    summary = pick.pick_runs(runs, tmp_path / "picked", repeats=1, sd=sd)
    losses = [summary["concepts"][TOKEN]["losses"][r] for r in runs]
    assert all(np.isfinite(losses))
    assert losses[0] == losses[1]  # the same vectors, the same draws: the same loss, to the bit
    assert losses[2] != losses[0]  # text_encoder_2's rows are read too
    assert losses[3] != losses[0]
    (kept,) = embedding_files.read(tmp_path / "picked" / "learned_embeds.safetensors")
    assert kept.vectors["text_encoder_2"].shape[0] == (1 if np.argmin(losses) == 3 else 2)
