"""tix eval: the paper's CLIP figures (tix.metrics), the sampling plan, the command end to end on tiny models, and the
toy world's scorer figures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tix import metrics
from tix.evaluation import Protocol, Subject, plan


def test_similarities_are_means_of_cosines():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 8)), rng.normal(size=(3, 8))
    want = np.mean([[x @ y / np.linalg.norm(x) / np.linalg.norm(y) for y in b] for x in a])
    assert metrics.image_similarity(a, b) == pytest.approx(want, abs=1e-6)
    assert metrics.image_similarity(3 * a, 0.5 * b) == pytest.approx(want, abs=1e-6)  # raw features: scale-free
    assert metrics.image_similarity(a[:1], a[:1]) == pytest.approx(1.0, abs=1e-6)
    text = rng.normal(size=8)
    assert metrics.text_similarity(a, text) == pytest.approx(np.mean(metrics.cosine_matrix(a, text[None])), abs=1e-6)
    assert metrics.text_similarity(np.eye(2), np.array([[0.0, 1.0]])) == pytest.approx(0.5)
    assert metrics.strip_token("a photo of {} on the moon") == "a photo of on the moon"
    assert metrics.strip_token("{} on the beach") == "on the beach"


def test_plan_pairs_phrases_with_the_same_noise():
    protocol = Protocol(samples=5, batch=2)
    token, caption = Subject("<t>", "<t>"), Subject("<t>", "a red toy")
    batches = plan([token, caption], protocol)
    per_subject = [[b for b in batches if b.subject == s] for s in (0, 1)]
    assert sum(b.count for b in per_subject[0]) == 5 * len(token.templates)
    assert all(len(b.prompts) == 2 for b in batches)  # padded: one compiled shape
    assert [b.seed for b in per_subject[0]] == [b.seed for b in per_subject[1]]
    assert len({b.seed for b in per_subject[0]}) == len(per_subject[0])  # distinct noise within a subject
    assert per_subject[1][0].prompts[0] == "a photo of a red toy"


def test_protocol_refuses_nonsense():
    from tix.errors import ConfigError

    with pytest.raises(ConfigError, match="samples=0"):
        Protocol(samples=0)


def _save_images(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")
    return folder


def test_eval_command_on_tiny_models(tiny_dirs, tmp_path):
    from tests.test_clip_model import build_clip
    from tix import cli, embedding_files

    sd_dir = tiny_dirs("sd1")
    clip_dir, _ = build_clip("small", tmp_path / "clip")
    rng = np.random.default_rng(0)
    images = _save_images(tmp_path / "images", rng.integers(0, 256, (3, 40, 48, 3), dtype=np.uint8))
    vectors = {"text_encoder": rng.normal(size=(2, 32)).astype(np.float32)}
    embedding_files.write(embedding_files.Concept("<tok>", vectors), tmp_path / "tok.safetensors")
    out = tmp_path / "out"
    cli.main([
        "eval", str(tmp_path / "tok.safetensors"), "--model", str(sd_dir), "--clip", str(clip_dir), "--images",
        str(images), "--phrase", "<tok>=a red cat", "--samples", "3", "--batch", "2", "--steps", "2", "--out", str(out),
    ])
    summary = json.loads((out / "eval.json").read_text())
    assert summary["protocol"]["samples"] == 3 and summary["protocol"]["sampler"] == "ddim"
    token, caption = summary["results"]
    assert (token["phrase"], caption["phrase"]) == ("<tok>", "a red cat")
    for result in (token, caption):
        assert result["references"] == 3
        assert -1 <= result["image_similarity"] <= 1 and -1 <= result["text_similarity"] <= 1
        edits = [v["text_similarity"] for k, v in result["prompts"].items() if "text_similarity" in v]
        assert len(edits) == 3 and result["text_similarity"] == pytest.approx(np.mean(edits))
    assert token["image_similarity"] != caption["image_similarity"]  # the phrase changes the samples
    page = (out / "eval.html").read_text()
    assert "a red cat" in page and page.count("<img") == 8
    assert all((out / src).is_file() for src in _sources(page))


def _sources(page: str) -> list[str]:
    return [part.split("'")[0] for part in page.split("src='")[1:]]


def test_eval_refuses_bad_input(tiny_dirs, tmp_path, capsys):
    from tix import cli

    with pytest.raises(SystemExit) as stop:
        cli.main(["eval", str(tmp_path / "missing.safetensors"), "--model", str(tiny_dirs("sd1"))])
    assert stop.value.code == 2 and "--clip" in capsys.readouterr().err


def test_toy_concept_is_what_every_training_image_shares():
    from tix.evaluation import shared_attributes, toy_concept
    from tix.toyworld import world

    for concept in world.benchmark_concepts()[:6]:
        images = world.concept_images(concept, 8, seed=3)
        found = toy_concept(concept.name, list(images))
        assert found.fixed == concept.fixed, concept.name
    # What the images share beyond the concept is context, read apart from it (the background never fixes it).
    concept = world.benchmark_concepts()[0]
    images = world.concept_images(concept, 6, seed=3, shared=("background",))
    context = world.shared_context(concept, 3, ("background",))
    assert toy_concept(concept.name, list(images)).fixed == concept.fixed
    assert shared_attributes(list(images)) == {**concept.fixed, **context}


def test_toy_scores_rank_a_describing_token_above_a_random_one(tmp_path):
    """On the toy world, eval's scorer figures tell a token made of the concept's words from a random vector."""
    import tix
    from tix.evaluation import TOY_EDITS, TOY_RECONSTRUCTION, evaluate_subjects
    from tix.models.clip import token_table
    from tix.toyworld import evaluate, world

    sd = tix.load("toyworld")
    concept = world.benchmark_concepts()[0]  # red striped square: every attribute has a word
    side = sd.text[0]
    table = np.asarray(token_table(sd.params[side.name]))
    words = [side.tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("red", "striped", "square")]
    sd.add_tokens("<words>", [table[words]])
    sd.add_tokens("<random>", evaluate.random_vectors(sd, 0))
    references = tuple(world.concept_images(concept, 5, seed=1))
    subjects = [Subject("<words>", "<words>", references), Subject("<words>", "<random>", references)]
    protocol = Protocol(samples=8, steps=10, sampler="dpm++2m", batch=8)
    results, images = evaluate_subjects(sd, subjects, protocol, toyworld=True, progress=False)
    assert images[0, TOY_RECONSTRUCTION].shape[0] == images[1, TOY_EDITS].shape[0] == 8
    words_score, random_score = (r["toyworld"] for r in results)
    assert words_score["attributes"] == concept.fixed
    # Each edit's share obeyed, named as the toy world writes its edits, the phrase as "{}".
    edits = dict(world.edit_prompts(concept, "{}"))
    assert words_score["edits_obeyed"] and set(words_score["edits_obeyed"]) <= set(edits)
    assert all(0.0 <= v <= 1.0 for v in words_score["edits_obeyed"].values())
    # The references were drawn on varied backgrounds: nothing to resemble beyond the concept.
    assert words_score["shared_context"] == {} and words_score["resemblance"] == words_score["reconstruction"]
    assert words_score["reconstruction"] > random_score["reconstruction"]
