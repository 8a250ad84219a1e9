"""Pipeline-level parity: tix.load + StableDiffusion against the PyTorch diffusers pipeline on the same folder."""

import numpy as np
import pytest
import torch

import tix

LONG = " ".join(["a red cat on a green background"] * 20)  # far past 77 tokens: truncated
PROMPTS = ["a photo of a cat", LONG, ""]


def _torch_pipe(folder, kind):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    return cls.from_pretrained(folder, torch_dtype=torch.float32)


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def pair(request, tiny_dirs):
    folder = tiny_dirs(request.param)
    return request.param, tix.load(folder), _torch_pipe(folder, request.param)


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_kind_is_read_from_checkpoint(pair):
    kind, sd, _ = pair
    assert sd.kind == kind


def test_encode_prompts_matches_diffusers(pair):
    kind, sd, pipe = pair
    context, pooled = sd.encode_prompts(PROMPTS)
    with torch.no_grad():
        if kind == "sdxl":
            ref, _, ref_pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        else:
            ref, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                        do_classifier_free_guidance=False)
    err = _max_err(context, ref.numpy())
    print(f"{kind} encode_prompts context max-abs {err:.2e}")
    assert context.shape == tuple(ref.shape)
    assert err < 1e-5
    if kind == "sdxl":
        perr = _max_err(pooled, ref_pooled.numpy())
        print(f"{kind} pooled max-abs {perr:.2e}")
        assert perr < 1e-5
    else:
        assert pooled is None


def test_predict_noise_matches_diffusers(pair):
    kind, sd, pipe = pair
    rng = np.random.default_rng(0)
    b = 3
    latents = rng.standard_normal((b, 16, 16, 4)).astype(np.float32)
    t = np.array([1, 500, 999])
    context, pooled = sd.encode_prompts(PROMPTS)
    time_ids = np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (b, 1))
    out = sd.predict_noise(latents, t, context, pooled=pooled, time_ids=time_ids if kind == "sdxl" else None)
    kwargs = {}
    if kind == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.from_numpy(np.asarray(pooled)),
                                       "time_ids": torch.from_numpy(time_ids)}
    with torch.no_grad():
        ref = pipe.unet(torch.from_numpy(latents).permute(0, 3, 1, 2), torch.from_numpy(t),
                        torch.from_numpy(np.asarray(context)), **kwargs).sample.permute(0, 2, 3, 1).numpy()
    err = _max_err(out, ref)
    print(f"{kind} predict_noise max-abs {err:.2e}")
    assert err < 1e-5


def test_vae_matches_diffusers(pair):
    kind, sd, pipe = pair
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    latents = sd.encode_images(images)
    with torch.no_grad():
        dist = pipe.vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist
        ref = (dist.mean * pipe.vae.config.scaling_factor).permute(0, 2, 3, 1).numpy()
    err = _max_err(latents, ref)
    print(f"{kind} encode_images max-abs {err:.2e}")
    assert err < 1e-5
    decoded = sd.decode_latents(latents)
    with torch.no_grad():
        z = torch.from_numpy(np.asarray(latents)).permute(0, 3, 1, 2) / pipe.vae.config.scaling_factor
        ref_img = pipe.vae.decode(z).sample.permute(0, 2, 3, 1).numpy()
    err = _max_err(decoded, ref_img)
    print(f"{kind} decode_latents max-abs {err:.2e}")
    assert err < 1e-5


def test_generate_is_deterministic_and_prompt_dependent(pair):
    _, sd, _ = pair
    a = sd.generate(["a red cat", "a blue dog"], steps=4, guidance=5.0, seed=3)
    b = sd.generate(["a red cat", "a blue dog"], steps=4, guidance=5.0, seed=3)
    c = sd.generate(["a red cat", "a blue dog"], steps=4, guidance=5.0, seed=4)
    d = sd.generate(["a green cat", "a blue dog"], steps=4, guidance=5.0, seed=3)
    assert a.shape == (2, sd.default_size, sd.default_size, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).max() > 0  # the seed matters
    assert np.abs(a[0].astype(int) - d[0].astype(int)).max() > 0  # so does the prompt, for its own image
    np.testing.assert_array_equal(a[1], d[1])  # and only for its own image


# ---------------------------------------------------------------------------------------------------------------------
# Tokens and prompts


@pytest.fixture(scope="module")
def sd1(tiny_dirs):
    return tix.load(tiny_dirs("sd1"))


def test_a_plain_word_token_matches_only_whole_words(tiny_dirs):
    sd = tix.load(tiny_dirs("sd1"))
    before = sd.tokenize(["a photo of a cat"])[0]
    sd.add_tokens("hoto", [np.zeros((2, sd.text[0].width), np.float32)])
    sd.add_tokens("<br>", [np.zeros((2, sd.text[0].width), np.float32)])
    np.testing.assert_array_equal(sd.tokenize(["a photo of a cat"])[0], before)  # "photo" keeps its own tokens
    hoto = sd.text[0].vocab_size  # the first placeholder row
    for prompt in ("a hoto cat", "a (HOTO), cat", "hoto's cat"):
        ids = sd.tokenize([prompt])[0][0]
        assert list(ids).count(hoto) == 1 and list(ids).count(hoto + 1) == 1, prompt  # both vectors, once
    assert sd.expand_prompt("hoto photos hotos") == "hoto hoto_1 photos hotos"
    # A bracketed token still matches inside words, as diffusers' tokenizers do ("<br>s": plural).
    assert sd.expand_prompt("two <br>s") == "two <br> <br>_1s"
    with pytest.raises(tix.errors.TixError, match="already"):
        sd.add_tokens("<BR>", [None])  # lower-cased prompts would make it the same token as <br>


def test_a_lone_vector_is_one_token_with_its_own_row(tiny_dirs):
    # A [D] vector once registered D sub-tokens sharing one row, so two such tokens encoded alike.
    sd = tix.load(tiny_dirs("sd1"))
    width = sd.text[0].width
    a, b = np.random.default_rng(0).normal(size=(2, width)).astype(np.float32)
    assert sd.add_tokens("<a>", [a]) == ["<a>"]
    sd.add_tokens("<b>", [b[None]])
    ids = sd.tokenize(["a <a>", "a <b>"])[0]
    assert ids[0, 2] == sd.text[0].vocab_size and ids[1, 2] == sd.text[0].vocab_size + 1
    ctx = np.asarray(sd.encode_prompts(["a <a>", "a <b>"])[0])
    assert np.abs(ctx[0, 2] - ctx[1, 2]).max() > 1e-3
    with pytest.raises(tix.errors.TixError, match=r"\[n, D\]"):
        sd.add_tokens("<c>", [np.zeros((1, 1, width))])


def test_overlong_prompts_are_cut_with_one_warning_naming_them(sd1, caplog):
    long_prompt = "a photo of " + " ".join(["red"] * 90) + " cat"
    with caplog.at_level("WARNING", logger="tix"):
        a = sd1.tokenize([long_prompt, "a cat"])[0]
        sd1.tokenize([long_prompt])
    warnings = [r.getMessage() for r in caplog.records if "tokens long" in r.getMessage()]
    assert len(warnings) == 1 and "a photo of red red" in warnings[0] and "77" in warnings[0]
    assert a.shape == (2, 77) and a[0, -1] == sd1.text[0].tokenizer.eos_token_id  # cut as diffusers cuts it
    counts = sd1.token_counts([long_prompt, "a cat"])
    assert counts[0] > 90 and counts[1] < 10 and f"is {counts[0]} tokens long" in warnings[0]


def test_models_are_freed_when_dropped(tiny_dirs):
    import gc
    import weakref

    def load_and_use():
        sd = tix.load(tiny_dirs("sd1"))
        sd.encode_prompts(["a cat"])  # fills the compiled-function cache
        sd.encode_images(np.zeros((1, sd.default_size, sd.default_size, 3), np.float32))
        return weakref.ref(sd), weakref.ref(sd.params["unet"]["conv_in"]["kernel"])

    refs = [load_and_use() for _ in range(3)]
    gc.collect()
    assert all(model() is None and weights() is None for model, weights in refs)
