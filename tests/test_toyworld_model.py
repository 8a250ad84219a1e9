"""The pretrained toy-world model tix ships: it is in the package, small, loads and draws in tix and in PyTorch
diffusers (the same weights giving the same text embeddings and noise predictions), and it draws what a prompt
names."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tix.loading
from tix.toyworld import model_dir, scorer
from tix.weights import read_safetensors

MAX_BYTES = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def sd():
    return tix.loading.load("toyworld")


def test_bundled_folder_is_a_small_diffusers_pipeline():
    folder = model_dir()
    files = [f for f in folder.rglob("*") if f.is_file()]
    total = sum(f.stat().st_size for f in files)
    assert total <= MAX_BYTES, f"toy-world model is {total / 1e6:.1f} MB"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    text_cfg = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert text_cfg["architectures"] == ["CLIPTextModel"]
    keys = read_safetensors(folder / "text_encoder" / "model.safetensors")
    assert all(k.startswith("text_model.") for k in keys)
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["prediction_type"], sched["beta_schedule"], sched["steps_offset"]) == ("epsilon", "scaled_linear", 1)
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] != 1.0  # set from the trained latents


# Every generate call below has the same batch (2), steps and guidance, so the sampling loop compiles once.
STEPS, GUIDANCE = 20, 7.5


def test_tix_loads_and_generates(sd):
    assert sd.kind == "sd1"
    images = sd.generate(["a red circle", "a blue striped square on a green background"], steps=STEPS,
                         guidance=GUIDANCE, seed=0)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert images.std() > 10  # an object on a background, not a flat field


def test_named_colour_and_shape_are_drawn(sd):
    # Chance is 1/5 for a colour and for a shape; the trained model draws the named ones far more often.
    images = np.concatenate([sd.generate(["a red circle"] * 2, steps=STEPS, guidance=GUIDANCE, seed=seed)
                             for seed in range(1, 5)])
    scored = scorer.score(images)
    red = sum(s["colour"] == "red" for s in scored)
    circles = sum(s["shape"] == "circle" for s in scored)
    assert red >= 6, scored
    assert circles >= 3, scored


def test_diffusers_loads_same_weights_and_generates(sd):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")

    # The bundled weights are stored in float16 (size); compute in float32 as tix does.
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(model_dir()), torch_dtype=torch.float32)
    prompt = "a small yellow dotted triangle"
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    np.testing.assert_array_equal(ids.numpy(), sd.tokenize([prompt])[0])
    with torch.no_grad():
        context_pt = pipe.text_encoder(ids)[0].numpy()
        latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        eps_pt = pipe.unet(latents, 500, torch.from_numpy(context_pt)).sample.numpy()
    context, _ = sd.encode_prompts([prompt])
    np.testing.assert_allclose(np.asarray(context), context_pt, atol=1e-4, rtol=1e-4)
    eps = sd.predict_noise(latents.numpy().transpose(0, 2, 3, 1), 500, context)
    np.testing.assert_allclose(np.asarray(eps).transpose(0, 3, 1, 2), eps_pt, atol=1e-4, rtol=1e-3)

    out = pipe([prompt], num_inference_steps=3, guidance_scale=5.0, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 32, 32, 3)
    assert np.isfinite(out.images).all() and out.images.std() > 0.02


def test_erased_words_reach_no_prompt_but_their_rows_still_draw(sd):
    # The shipped tokenizer spells "heart" and "purple" in pieces (no whole-word token), no row of the shipped
    # token table is an erased row, and the erased rows, loaded back as tokens, draw what the words drew in training.
    from tix.models.clip import token_table
    from tix.toyworld import world
    from tix.toyworld.model import ERASED_FILE

    for word in world.ERASED_WORDS:
        ids = sd.tokenize([word])[0][0]
        assert (ids != ids[-1]).sum() > 3, f"{word!r} is one token of the shipped tokenizer"
    erased = read_safetensors(model_dir() / ERASED_FILE)
    assert sorted(erased) == [f"<{w}>" for w in world.ERASED_WORDS]
    table = np.asarray(token_table(sd.params[sd.text[0].name]), np.float32)
    for row in erased.values():
        assert np.abs(table - np.asarray(row, np.float32).reshape(1, -1)).max(axis=1).min() > 1e-3
    sd.load_embeddings(str(model_dir() / ERASED_FILE), token="<heart>")
    images = np.concatenate([sd.generate(["a <heart>"] * 2, steps=STEPS, guidance=GUIDANCE, seed=seed)
                             for seed in range(4)])
    hearts = sum(s["shape"] == "heart" for s in scorer.score(images))
    assert hearts >= 6, hearts


def test_scorer_reads_the_shipped_vaes_reconstructions(sd):
    # A generated image is at best the VAE's decoding of a render, which smears dots into short rows: the scorer
    # must read those as what was rendered, or it blames the model for its own VAE (at the old stripe threshold one
    # reconstructed dotted render in ten read as striped; by direction alone, without the dots' spacing, 2.5%).
    from tix.pipeline import to_uint8
    from tix.toyworld import world

    images, _, scenes = world.dataset(400, 20_261_203, 32, return_scenes=True)
    decoded = np.asarray(to_uint8(sd.decode_latents(sd.encode_images(images.astype(np.float32) / 127.5 - 1.0))))
    scored = scorer.score(decoded)
    accuracy = {a: float(np.mean([s[a] == getattr(t, a) for s, t in zip(scored, scenes, strict=True)]))
                for a in world.ATTRIBUTES}
    print("\nscorer on VAE reconstructions: " + ", ".join(f"{a} {v:.2%}" for a, v in accuracy.items()))
    assert min(accuracy.values()) >= 0.97, accuracy


def test_blended_caption_ids_feed_one_position_the_mean_of_its_words(sd):
    # What `train_toyworld.py --blend` trains on: the noun phrase as one position whose input is the mean of its
    # words' token rows, everything else (BOS, the other words, EOS and padding) exactly as the plain caption.
    import jax.numpy as jnp

    from tix.models.clip import token_table
    from tix.toyworld import model as M
    from tix.toyworld import world

    side = sd.text[0]
    params = sd.params[side.name]
    plain, blended = M.CaptionIds(side.tokenizer), M.CaptionIds(side.tokenizer, parts=4)
    captions = ["a photo of a small yellow dotted triangle on a blue background", "", "a red circle"]
    ids = blended(captions)
    assert ids.shape == (3, 77, 4) and (ids[..., 0] == plain(captions)).all() and (ids[..., 1:] == -1).all()
    assert np.array_equal(M.encode_captions(side.model, params, jnp.asarray(ids)),
                          M.encode_captions(side.model, params, jnp.asarray(plain(captions))))

    fused = blended([world.blend_noun(captions[0])])[0]
    words = plain(["small yellow dotted triangle"])[0, 1:5]
    assert (fused[5] == words).all() and fused[6, 0] == plain(captions)[0, 9]  # "on" moves up three places
    table = np.asarray(token_table(params))
    rows = np.stack([table[i[i >= 0]].mean(axis=0) for i in fused])
    expected = side.model.apply({"params": params}, jnp.asarray(fused[None, :, 0]),
                                inputs_embeds=jnp.asarray(rows[None])).last_hidden_state
    got = M.encode_captions(side.model, params, jnp.asarray(fused[None]))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-6)
    with pytest.raises(ValueError, match="blended words"):
        M.CaptionIds(side.tokenizer, parts=2)(["a small+red+circle"])
