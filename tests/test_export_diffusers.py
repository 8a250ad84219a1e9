"""Exports that travel: every file tix writes is loaded by PyTorch diffusers, and both sides then encode prompts with
the learned token identically; the same files loaded back into tix with `sd.load_embeddings` give tix's encoding.

Pooled output on SDXL (the trap in models.md): the tiny checkpoints carry the legacy `eos_token_id: 2`, so transformers
pools text_encoder_2 at argmax(input_ids). Placeholder ids are appended after the vocabulary, so in diffusers the
pooled embedding of a prompt containing a learned token is taken at the (last) placeholder position. tix pools at the
first EOS, the position the model was trained with. The two pooled embeddings therefore differ exactly for prompts
with a learned token and agree for every other prompt; the context (what cross-attention sees) agrees in both cases.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tix
from tix import embedding_files as ef
from tix.embedding_files import EmbeddingFileError

ROOT = Path(__file__).resolve().parent.parent

# (format, torch_pickle) per family; SDXL a1111/kohya are the {clip_l, clip_g} file, diffusers the two-file form.
SD_CASES = [("diffusers", False), ("diffusers", True), ("a1111", True), ("a1111", False), ("kohya", False),
            ("kohya", True)]
SDXL_CASES = [("diffusers", False), ("diffusers", True), ("a1111", False), ("a1111", True), ("kohya", False),
              ("kohya", True)]


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _torch_pipe(folder: Path, kind: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _encoders(pipe, kind: str):
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if kind == "sdxl":
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def _torch_rows(tokenizer, text_encoder, names: list[str]) -> np.ndarray:
    ids = tokenizer.convert_tokens_to_ids(names)
    assert all(i is not None and i >= 0 and i != tokenizer.unk_token_id for i in ids), (names, ids)
    return text_encoder.get_input_embeddings().weight.detach()[ids].numpy()


def _tix_rows(side, token: str, n: int) -> np.ndarray:
    names = [token] + [f"{token}_{i}" for i in range(1, n)]
    return side.extra[[side.added.index(name) for name in names]]


def _torch_encode(pipe, kind: str, prompts: list[str]):
    with torch.no_grad():
        if kind == "sdxl":
            context, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
            return context.numpy(), pooled.numpy()
        context, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                        do_classifier_free_guidance=False)
        return context.numpy(), None


def _random_concept(token: str, widths: list[int], n: int, seed: int) -> ef.Concept:
    rng = np.random.default_rng(seed)
    # Scaled like real CLIP token embeddings (norm ~0.4), so the text encoder is in its usual range.
    return ef.Concept(token, {name: (0.015 * rng.standard_normal((n, w))).astype(np.float32)
                              for name, w in zip(ef.ENCODERS, widths, strict=False)})


def _load_into_diffusers(pipe, kind: str, files: list[Path], fmt: str, token: str) -> None:
    """How a user loads each export into diffusers (formats.md, 'What the consumers accept')."""
    if kind == "sdxl" and fmt == "diffusers":
        pipe.load_textual_inversion(str(files[0]))
        pipe.load_textual_inversion(str(files[1]), tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2)
    elif kind == "sdxl":
        # diffusers has no clip_l/clip_g handling: the user splits the file and loads each half into its encoder.
        state = _torch_state(files[0])
        for key, (tokenizer, encoder) in zip(("clip_l", "clip_g"), _encoders(pipe, kind), strict=True):
            pipe.load_textual_inversion(state[key], token=token, tokenizer=tokenizer, text_encoder=encoder)
    elif fmt == "a1111" and files[0].suffix == ".pt":
        pipe.load_textual_inversion(str(files[0]))  # the token comes from the file's "name"
    elif fmt == "diffusers":
        pipe.load_textual_inversion(str(files[0]))
    else:
        pipe.load_textual_inversion(str(files[0]), token=token)  # emb_params: diffusers would call it "emb_params"


def _torch_state(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def loaded(request, tiny_dirs, tmp_path_factory):
    """Every export format x n in {1, 3} written for one family, loaded into a tix model and a diffusers pipeline."""
    kind = request.param
    folder = tiny_dirs(kind)
    sd, pipe = tix.load(folder), _torch_pipe(folder, kind)
    widths = [side.width for side in sd.text]
    out = tmp_path_factory.mktemp(f"exports-{kind}")
    tokens = []
    for i, (fmt, pickled) in enumerate(SDXL_CASES if kind == "sdxl" else SD_CASES):
        for n in (1, 3):
            wanted = f"<{kind}-{fmt}-{'pt' if pickled else 'st'}-{n}>"
            concept = _random_concept(wanted, widths, n, seed=10 * i + n)
            files = ef.write(concept, out / f"{fmt}-{int(pickled)}-{n}", fmt, torch_pickle=pickled)
            assert len(files) == (2 if kind == "sdxl" and fmt == "diffusers" else 1)
            names = sd.load_embeddings(files[0])
            # Files that hold no token of their own (kohya/{clip_l,clip_g} pickles) are named after the file, as A1111
            # and ComfyUI name them; every other export carries the token.
            token = files[0].stem if pickled and fmt != "diffusers" and (fmt == "kohya" or kind == "sdxl") else wanted
            assert names == [token]
            _load_into_diffusers(pipe, kind, files, fmt, token)
            tokens.append((fmt, pickled, n, token, concept))
    return kind, sd, pipe, tokens


def test_token_rows_in_pytorch_table_equal_tix_vectors(loaded):
    kind, sd, pipe, tokens = loaded
    for fmt, pickled, n, token, concept in tokens:
        for side, name, (tokenizer, encoder) in zip(sd.text, ef.ENCODERS, _encoders(pipe, kind), strict=False):
            names = [token] + [f"{token}_{i}" for i in range(1, n)]
            torch_rows = _torch_rows(tokenizer, encoder, names)
            np.testing.assert_array_equal(torch_rows, concept.vectors[name], err_msg=f"{fmt} {pickled} {n} {name}")
            np.testing.assert_array_equal(torch_rows, _tix_rows(side, token, n), err_msg=f"{fmt} {pickled} {n}")


def test_context_with_learned_tokens_matches_diffusers(loaded):
    kind, sd, pipe, tokens = loaded
    prompts = [f"a photo of {token} on a red background" for *_, token, _ in tokens]
    three = next(token for _, _, n, token, _ in tokens if n == 3)
    # Punctuation, plurals and repeats: the tokenizer splits the token out of each, and both sides expand it there.
    prompts += [f"{three}, a painting", f"a {three} and {three} toy", f"a,({three})s{three}", "a photo of a cat"]
    context, pooled = sd.encode_prompts(prompts)
    ref_context, ref_pooled = _torch_encode(pipe, kind, prompts)
    err = _max_err(context, ref_context)
    print(f"{kind}: context max-abs vs diffusers over {len(prompts)} prompts: {err:.2e}")
    assert context.shape == ref_context.shape
    assert err < 1e-4
    # Each token changes the encoding: the comparison is not vacuous.
    plain, _ = sd.encode_prompts(["a photo of a cat on a red background"])
    assert float(np.abs(np.asarray(context[0]) - np.asarray(plain[0])).max()) > 1e-3
    if kind != "sdxl":
        assert pooled is None
        return

    # Pooled: differs from diffusers for every prompt with a learned token, agrees for the one without.
    per_prompt = np.abs(np.asarray(pooled) - ref_pooled).max(axis=1)
    print(f"sdxl pooled max-abs vs diffusers, with token: min {per_prompt[:-1].min():.2e}; "
          f"without: {per_prompt[-1]:.2e}")
    assert (per_prompt[:-1] > 1e-3).all()
    assert per_prompt[-1] < 1e-4

    # What each side pools: tix the first EOS, diffusers argmax(ids), the last placeholder sub-token.
    encoder = pipe.text_encoder_2
    expanded = [pipe.maybe_convert_prompt(p, pipe.tokenizer_2) for p in prompts]
    ids = pipe.tokenizer_2(expanded, padding="max_length", max_length=77, truncation=True,
                           return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = encoder(ids, output_hidden_states=True).hidden_states[-1]
        hidden = encoder.text_model.final_layer_norm(hidden)
        eos = (ids == pipe.tokenizer_2.eos_token_id).int().argmax(dim=1)
        rows = torch.arange(len(prompts))
        at_eos = encoder.text_projection(hidden[rows, eos]).numpy()
        at_argmax = encoder.text_projection(hidden[rows, ids.argmax(dim=1)]).numpy()
    assert _max_err(pooled, at_eos) < 1e-4
    assert _max_err(ref_pooled, at_argmax) < 1e-4


def test_tix_vectors_match_the_exported_ones(loaded):
    kind, sd, _, tokens = loaded
    for fmt, _, n, token, concept in tokens:
        for side, name in zip(sd.text, ef.ENCODERS, strict=False):
            np.testing.assert_array_equal(_tix_rows(side, token, n), concept.vectors[name], err_msg=f"{fmt} {n}")


def test_pytorch_pipeline_generates_with_the_token(loaded):
    kind, _, pipe, tokens = loaded
    token = next(token for _, _, n, token, _ in tokens if n == 3)
    image = pipe(f"a photo of {token}", num_inference_steps=2, output_type="np", height=32, width=32,
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3)
    assert np.isfinite(image).all()


# ---------------------------------------------------------------------------------------------------------------------
# Loading errors and multi-vector naming


@pytest.fixture(scope="module")
def sd1(tiny_dirs):
    return tix.load(tiny_dirs("sd1"))


def _save(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(path))
    return path


def test_load_embeddings_errors_name_both_sides(sd1, tmp_path):
    before = (list(sd1.text[0].added), None if sd1.text[0].extra is None else sd1.text[0].extra.copy())
    rng = np.random.default_rng(0)

    wide = _save(tmp_path / "wide.safetensors", {"<wide>": rng.standard_normal((1, 768))})
    with pytest.raises(EmbeddingFileError, match=r"768.*32|32.*768") as err:
        sd1.load_embeddings(wide)
    assert "SD 1.x" in str(err.value)

    xl = _save(tmp_path / "xl.safetensors", {"clip_l": rng.standard_normal((1, 32)),
                                             "clip_g": rng.standard_normal((1, 32))})
    with pytest.raises(EmbeddingFileError, match="SDXL") as err:
        sd1.load_embeddings(xl)
    assert "SD 1.x" in str(err.value)

    several = _save(tmp_path / "several.safetensors", {"<a>": rng.standard_normal((1, 32)),
                                                        "<b>": rng.standard_normal((1, 32))})
    with pytest.raises(EmbeddingFileError, match="'<a>', '<b>'"):
        sd1.load_embeddings(several)
    # ... and token= picks one of them.
    assert sd1.load_embeddings(several, token="<b>") == ["<b>"]
    with pytest.raises(tix.errors.TixError, match="already"):
        sd1.load_embeddings(several, token="<b>")
    assert sd1.text[0].added == before[0] + ["<b>"]  # failed loads added nothing


def test_sd_file_into_sdxl_model_is_refused(tiny_dirs, tmp_path):
    sd = tix.load(tiny_dirs("sdxl"))
    path = _save(tmp_path / "sd.safetensors", {"<one>": np.zeros((1, 32))})
    with pytest.raises(EmbeddingFileError, match="SDXL"):
        sd.load_embeddings(path)
    assert all(not side.added for side in sd.text)


def test_add_tokens_is_all_or_nothing(tiny_dirs):
    sd = tix.load(tiny_dirs("sdxl"))
    with pytest.raises(tix.errors.TixError, match="width"):
        sd.add_tokens("<half>", [np.zeros((1, 32)), np.zeros((1, 7))])
    assert all(not side.added and side.extra is None for side in sd.text)
    assert [len(side.tokenizer) for side in sd.text] == [side.vocab_size for side in sd.text]


def test_multi_vector_naming_matches_diffusers(sd1, tiny_dirs, tmp_path):
    """`<tok>, <tok>_1, ...` keys (diffusers' tokenizer naming) and kohya's `tok, tok1, ...` are one token."""
    rng = np.random.default_rng(1)
    vectors = {name: (0.015 * rng.standard_normal((3, 32))).astype(np.float32) for name in ("mv", "kt")}
    diffusers_style = _save(tmp_path / "mv.safetensors", {"<mv>": vectors["mv"][0], "<mv>_1": vectors["mv"][1],
                                                          "<mv>_2": vectors["mv"][2]})
    kohya_style = _save(tmp_path / "kt.safetensors", {"kt": vectors["kt"][:1], "kt1": vectors["kt"][1:2],
                                                      "kt2": vectors["kt"][2:]})
    assert sd1.load_embeddings(diffusers_style) == ["<mv>"]
    assert sd1.load_embeddings(kohya_style) == ["kt"]
    pipe = _torch_pipe(tiny_dirs("sd1"), "sd1")
    pipe.load_textual_inversion(torch.from_numpy(vectors["mv"]), token="<mv>")
    pipe.load_textual_inversion(torch.from_numpy(vectors["kt"]), token="kt")
    # Not "kts": diffusers' tokenizer splits a plain-word token out of longer words ("kts" -> "kt" + "s"); tix
    # matches such a token only as a whole word, so "hoto" cannot take over "photo" (checked below).
    prompts = ["a photo of <mv> on a red background", "a kt painting", "<mv> and kt, in the style of kt",
               "(<mv>),kt", "<mv>s and kt's"]
    context, _ = sd1.encode_prompts(prompts)
    ref, _ = _torch_encode(pipe, "sd1", prompts)
    err = _max_err(context, ref)
    print(f"multi-vector naming: context max-abs vs diffusers {err:.2e}")
    assert err < 1e-4
    for token in ("<mv>", "kt"):
        assert sd1.expand_prompt(f"a {token} cat") == f"a {token} {token}_1 {token}_2 cat"
    assert sd1.expand_prompt("(<mv>)s <mv>_1") == "(<mv> <mv>_1 <mv>_2)s <mv>_1"  # a spelled sub-token stays one
    assert sd1.expand_prompt("kts") == "kts"

    # The tokenizer matches added tokens ignoring case, so tix expands "<MV>" too; diffusers looks the lower-cased
    # token up case-sensitively and would use only the first vector for a mixed-case spelling.
    upper, _ = sd1.encode_prompts(["a photo of <MV> on a red background"])
    assert _max_err(upper[0], ref[0]) < 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# tix generate --embeddings


def test_cli_generate_with_embeddings(tiny_dirs, tmp_path):
    folder = tiny_dirs("sd1")
    diffusers_file = ef.write(_random_concept("<gen>", [32], 2, 3), tmp_path / "gen", "diffusers")[0]
    a1111_file = ef.write(_random_concept("<old>", [32], 1, 4), tmp_path / "old", "a1111", torch_pickle=True)[0]
    assert a1111_file.suffix == ".pt"
    out = tmp_path / "images"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "tix.cli", "generate", "--model", str(folder), "--prompt", "a <gen> next to <old>",
         "--n", "2", "--steps", "2", "--size", "32", "--sampler", "ddim", "--embeddings", str(diffusers_file),
         str(a1111_file), "--out", str(out)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "loaded <gen>" in proc.stdout and "loaded <old>" in proc.stdout
    images = sorted(p for p in out.glob("*.png") if not p.name.endswith("grid.png"))
    assert len(images) == 2
    for path in images:
        with Image.open(path) as image:
            assert image.size == (32, 32)

    bad = subprocess.run(
        [sys.executable, "-m", "tix.cli", "generate", "--model", str(folder), "--prompt", "x", "--n", "1",
         "--steps", "1", "--size", "32", "--embeddings", str(_save(tmp_path / "w.safetensors",
                                                                   {"<w>": np.zeros((1, 768))})),
         "--out", str(out / "bad")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 2
    assert "768" in bad.stderr and "32" in bad.stderr and "Traceback" not in bad.stderr
