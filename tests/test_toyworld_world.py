"""The toy world's generator, captions, concepts and attribute scorer."""

from collections import Counter

import numpy as np
import pytest

from tix.toyworld import scorer, world

# Held out: the scorer's thresholds were tuned on dataset seeds 0-3 and its prototypes use their own seed.
HELD_OUT_SEED = 20_251_126
N_HELD_OUT = 600


def _degrade(images: np.ndarray, seed: int, noise: float, blur: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = scorer.gaussian_blur(images, blur) if blur else images.astype(np.float32)
    return np.clip(np.rint(x + rng.normal(0.0, noise, x.shape)), 0, 255).astype(np.uint8)


def _accuracy(images: np.ndarray, scenes: list[world.Scene]) -> dict[str, float]:
    scored = scorer.score(images)
    pairs = list(zip(scored, scenes, strict=True))
    return {a: float(np.mean([s[a] == getattr(t, a) for s, t in pairs])) for a in world.ATTRIBUTES}


@pytest.fixture(scope="module")
def held_out():
    return world.dataset(N_HELD_OUT, HELD_OUT_SEED, 32, return_scenes=True)


def test_held_out_covers_every_value(held_out):
    _, _, scenes = held_out
    for attribute, values in world.VALUES.items():
        counts = Counter(getattr(s, attribute) for s in scenes)
        assert set(counts) == set(values)
        assert min(counts.values()) >= N_HELD_OUT // (3 * len(values))


@pytest.mark.parametrize(
    "condition, noise, blur",
    [("clean", 0.0, 0.0), ("noise 10/255", 10.0, 0.0), ("blur 0.6 px", 0.0, 0.6), ("noise 10 + blur 0.6", 10.0, 0.6)],
)
def test_scorer_accuracy_32px(held_out, condition, noise, blur):
    images, _, scenes = held_out
    if noise or blur:
        images = _degrade(images, 1, noise, blur)
    accuracy = _accuracy(images, scenes)
    print(f"\n32 px {condition}: " + ", ".join(f"{a} {v:.2%}" for a, v in accuracy.items()))
    assert min(accuracy.values()) >= 0.98, accuracy


def test_scorer_accuracy_64px():
    images, _, scenes = world.dataset(200, HELD_OUT_SEED + 1, 64, return_scenes=True)
    for condition, x in [("clean", images), ("noise 10 + blur 1.2", _degrade(images, 2, 10.0, 1.2))]:
        accuracy = _accuracy(x, scenes)
        print(f"\n64 px {condition}: " + ", ".join(f"{a} {v:.2%}" for a, v in accuracy.items()))
        assert min(accuracy.values()) >= 0.98, accuracy


def test_scorer_is_deterministic(held_out):
    # Its speed is measured by benchmarks/scorer_speed.py, not asserted here.
    images = np.concatenate([held_out[0]] * 2)
    first = scorer.score(images)
    assert scorer.score(images[:50]) == first[:50]
    assert first[:len(held_out[0])] == first[len(held_out[0]):]


def test_scorer_empty_image_and_matches():
    blank = np.full((2, 32, 32, 3), world.BACKGROUNDS["gray"], dtype=np.uint8)
    scored = scorer.score(blank)
    assert scored[0] == {"shape": None, "colour": None, "pattern": None, "background": "gray", "size": None}
    assert scorer.matches(scored[0], {"background": "gray"})
    assert not scorer.matches(scored[0], {"background": "gray", "shape": "circle"})
    image = world.render(world.Scene("star", "red", "dotted", "blue", "large", 0.5, 0.5, 0.7))
    one = scorer.score(image)[0]
    assert scorer.matches(one, {"shape": "star", "colour": "red", "pattern": "dotted"})
    assert not scorer.matches(one, {"shape": "star", "colour": "blue"})


def test_determinism():
    a_images, a_captions = world.dataset(64, 5, 32)
    b_images, b_captions = world.dataset(64, 5, 32)
    c_images, c_captions = world.dataset(64, 6, 32)
    assert a_images.dtype == np.uint8 and a_images.shape == (64, 32, 32, 3)
    np.testing.assert_array_equal(a_images, b_images)
    assert a_captions == b_captions
    assert not np.array_equal(a_images, c_images) and a_captions != c_captions
    concept = world.benchmark_concepts()[0]
    shots = world.concept_images(concept, 5, 3)
    np.testing.assert_array_equal(shots, world.concept_images(concept, 5, 3))
    assert not np.array_equal(shots, world.concept_images(concept, 5, 4))  # the seed picks the shots


def test_render_sizes_and_margins(held_out):
    images, _, scenes = held_out
    # The object never touches the border, so the border is pure background (the scorer relies on it).
    for image, scene in zip(images[:200], scenes[:200], strict=True):
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert (border == world.BACKGROUNDS[scene.background]).all()
    big = world.render(scenes[0], 64)
    assert big.shape == (64, 64, 3)
    # The 64 px render is the 32 px one with finer edges: averaging 2x2 blocks gives it back closely.
    pooled = big.reshape(32, 2, 32, 2, 3).astype(np.float32).mean(axis=(1, 3))
    assert np.abs(pooled - images[0]).mean() < 2.0


def test_sample_scene_fixed_and_invalid():
    rng = np.random.default_rng(0)
    scene = world.sample_scene(rng, shape="heart", colour="purple", size="small")
    assert (scene.shape, scene.colour, scene.size) == ("heart", "purple", "small")
    assert abs(scene.scale - world.SIZE_SCALE["small"]) <= world.SCALE_JITTER
    with pytest.raises(ValueError, match="shape"):
        world.sample_scene(rng, shape="hexagon")
    with pytest.raises(ValueError, match="attribute"):
        world.sample_scene(rng, texture="furry")


def test_captions_name_only_true_and_nameable_values():
    _, captions, scenes = world.dataset(3000, 11, 8, return_scenes=True)
    unnamed_words = set().union(*world.UNNAMED.values())
    named_counts = Counter()
    for text, scene in zip(captions, scenes, strict=True):
        words = text.split()
        assert not unnamed_words & set(words), text
        phrase, _, background = text.partition(" on ")
        phrase_words = set(phrase.split())
        # Every attribute word in the noun phrase is true of the scene.
        for attribute in ("size", "colour", "pattern", "shape"):
            named = phrase_words & set(world.VALUES[attribute])
            assert named <= {getattr(scene, attribute)}, (text, scene)
            named_counts[attribute] += bool(named)
        assert phrase.split()[-1] in (scene.shape, world.NOUN_UNNAMED), text
        if background:
            assert background.split()[-2 if background.endswith("background") else -1] == scene.background, text
            named_counts["background"] += 1
        if scene.shape in world.UNNAMED_SHAPES:
            assert phrase.split()[-1] == "object"
    # Each nameable attribute is named in some captions and omitted in others.
    for attribute in world.ATTRIBUTES:
        assert 0.25 * len(captions) < named_counts[attribute] < 0.8 * len(captions), named_counts
    assert len(set(captions)) > 500


def test_vocabulary_covers_every_word_and_no_unnamed_value():
    vocab = set(world.vocabulary())
    _, captions = world.dataset(2000, 12, 8)
    used = {word for text in captions for word in text.split()}
    token = "<toy-0>"
    for concept in world.benchmark_concepts():
        used.update(concept.best_caption().split())
        used.add(concept.initializer)
        for prompt, _ in world.edit_prompts(concept, token):
            used.update(w for w in prompt.split() if w != token)
    for template in (*world.TEMPLATES, world.RECONSTRUCTION_TEMPLATE):
        used.update(template.replace("{}", " ").split())
    assert used <= vocab, used - vocab
    assert not vocab & set().union(*world.UNNAMED.values())


def test_training_captions_speak_the_erased_words_which_the_shipped_vocabulary_lacks():
    # The model learns a word for every value; the erased ones are then cut from the shipped tokenizer.
    assert world.ERASED_WORDS == ("heart", "purple")
    _, captions, scenes = world.dataset(3000, 13, 8, return_scenes=True, erased=True)
    spoken = Counter()
    for text, scene in zip(captions, scenes, strict=True):
        words = set(text.split())
        for attribute, value in (("shape", "heart"), ("colour", "purple")):
            if value in words:
                assert getattr(scene, attribute) == value, (text, scene)
                spoken[value] += 1
    # Named about as often as any nameable value (shape 0.75 x 1/5, colour 0.6 x 1/5 of captions).
    assert 0.1 * len(captions) < spoken["heart"] < 0.2 * len(captions), spoken
    assert 0.07 * len(captions) < spoken["purple"] < 0.17 * len(captions), spoken
    # Erasing changes words only: the same seed gives the same scenes and, without unnamed values, the same captions.
    _, plain, plain_scenes = world.dataset(3000, 13, 8, return_scenes=True)
    assert plain_scenes == scenes
    for a, b, scene in zip(plain, captions, scenes, strict=True):
        if scene.shape != "heart" and scene.colour != "purple":
            assert a == b
    assert set(world.vocabulary(erased=True)) - set(world.vocabulary()) == set(world.ERASED_WORDS)


def test_blend_noun_fuses_the_noun_phrase_and_nothing_else():
    _, captions, scenes = world.dataset(500, 14, 8, return_scenes=True, erased=True)
    fused = 0
    for text, scene in zip(captions, scenes, strict=True):
        blended = world.blend_noun(text)
        assert blended.replace(world.BLEND, " ") == text
        joined = [w for w in blended.split() if world.BLEND in w]
        assert len(joined) <= 1
        if joined:
            fused += 1
            parts = joined[0].split(world.BLEND)
            assert parts[-1] in (scene.shape, world.NOUN_UNNAMED)
            assert set(parts[:-1]) <= {scene.size, scene.colour, scene.pattern}
            assert f"{joined[0]} on" in blended or blended.endswith(joined[0])
    assert fused > 100
    assert world.blend_noun("") == "" and world.blend_noun("a circle on blue") == "a circle on blue"
    assert world.blend_noun("an image of a blue dotted circle on blue") == "an image of a blue+dotted+circle on blue"


def test_vocabulary_tokenizes_to_whole_words(tmp_path):
    from tix.tokenizer import load_tokenizer, write_clip_tokenizer

    write_clip_tokenizer(tmp_path, world.vocabulary())
    tok = load_tokenizer(tmp_path)
    text = "a photo of a small red striped circle on a blue background"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.split()) + 2


def test_benchmark_concepts():
    concepts = world.benchmark_concepts()
    assert len(concepts) >= 8 and len({c.name for c in concepts}) == len(concepts)
    assert sum(c.nameable for c in concepts) >= 3 and sum(not c.nameable for c in concepts) >= 4
    by_name = {c.name: c for c in concepts}
    assert by_name["yellow_dotted_heart"].best_caption() == "a yellow dotted object"
    assert by_name["yellow_dotted_heart"].initializer == "object"
    assert by_name["red_striped_square"].best_caption() == "a red striped square"
    assert by_name["red_striped_square"].initializer == "square"
    assert by_name["purple_striped_heart"].best_caption() == "a striped object"
    assert by_name["large_purple_heart"].best_caption() == "a large solid object"
    with pytest.raises(ValueError, match="background"):
        world.Concept("bad", {"background": "blue"})


def test_sample_concepts_draws_distinct_named_and_unnamed_concepts_from_a_seed():
    concepts = world.sample_concepts(10, 6, seed=3)
    assert [c.nameable for c in concepts] == [True] * 10 + [False] * 6
    assert len({c.name for c in concepts}) == 16
    assert all(set(c.fixed) == {"shape", "colour", "pattern"} for c in concepts)
    assert world.sample_concepts(10, 6, seed=3) == concepts
    assert {c.name for c in world.sample_concepts(10, 6, seed=4)} != {c.name for c in concepts}
    # Every unnamed concept is one of the 27 with a heart or purple; asking for all of them draws each once.
    every = world.sample_concepts(0, 27, seed=0)
    assert len({c.name for c in every}) == 27 and all(c.unnamed for c in every)
    with pytest.raises(ValueError, match="27 distinct unnamed"):
        world.sample_concepts(0, 28, seed=0)


def test_concept_images_keep_fixed_attributes():
    for i, concept in enumerate(world.benchmark_concepts()):
        images = world.concept_images(concept, 24, seed=100 + i)
        assert images.shape == (24, 32, 32, 3)
        scored = scorer.score(images)
        assert all(scorer.matches(s, concept.expected()) for s in scored), (concept.name, scored)
        # What the concept leaves free still varies.
        assert len({s["background"] for s in scored}) >= 3
        if "size" not in concept.fixed:
            assert len({s["size"] for s in scored}) == 2


def test_concept_images_share_what_they_are_told_to():
    concept = world.benchmark_concepts()[0]  # fixes shape, colour and pattern; size is free
    contexts = set()
    for seed in range(4):
        scored = scorer.score(world.concept_images(concept, 12, seed, shared=("background", "size")))
        assert all(scorer.matches(s, concept.expected()) for s in scored)
        assert len({s["background"] for s in scored}) == 1 and len({s["size"] for s in scored}) == 1
        contexts.add((scored[0]["background"], scored[0]["size"]))
    assert len(contexts) >= 2  # the seed draws the shared context
    # Sharing leaves the default's images alone, and a fixed attribute wins over a shared one.
    np.testing.assert_array_equal(world.concept_images(concept, 3, 7), world.concept_images(concept, 3, 7, shared=()))
    scored = scorer.score(world.concept_images(concept, 6, 7, shared=("colour",)))
    assert {s["colour"] for s in scored} == {"red"}
    with pytest.raises(ValueError, match="attribute 'room'"):
        world.concept_images(concept, 3, 7, shared=("room",))


def test_edit_prompts():
    token = "<toy-0>"
    for concept in world.benchmark_concepts():
        edits = world.edit_prompts(concept, token)
        assert len(edits) >= 8
        for prompt, overrides in edits:
            assert prompt.count(token) == 1
            assert overrides and not set(overrides) & set(concept.fixed)
            for attribute, value in overrides.items():
                assert value in prompt.split() and value not in world.UNNAMED[attribute]
            expected = concept.expected(overrides)
            assert expected == {**concept.fixed, **overrides}
        assert ("a <toy-0> on a green background", {"background": "green"}) in edits
        if "size" not in concept.fixed:
            assert (f"a small {token}", {"size": "small"}) in edits
