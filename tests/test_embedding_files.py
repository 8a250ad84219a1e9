"""Embedding file I/O: round trips for every format, PyTorch diffusers' load_textual_inversion as the oracle for what
the exports mean, the foreign formats tix reads, and the safety properties (no path escape, no pickle code, atomic
writes)."""

from __future__ import annotations

import base64
import json
import os
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import tix
from tix import embedding_files as ef
from tix.errors import TixError

rng = np.random.default_rng(0)


def concept(token: str, widths: tuple[int, ...], n: int = 2) -> ef.Concept:
    names = ef.ENCODERS[: len(widths)]
    return ef.Concept(token, {k: rng.standard_normal((n, w)).astype(np.float32)
                              for k, w in zip(names, widths, strict=True)})


def assert_same(a: ef.Concept, b: ef.Concept) -> None:
    assert a.vectors.keys() == b.vectors.keys()
    for name in a.vectors:
        assert b.vectors[name].dtype == np.float32
        np.testing.assert_array_equal(a.vectors[name], b.vectors[name])


# ---------------------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("widths", [(32,), (768,), (1024,), (32, 48), (768, 1280)], ids=str)
@pytest.mark.parametrize("pickled", [False, True], ids=["safetensors", "pickle"])
@pytest.mark.parametrize("fmt", ef.FORMATS)
def test_round_trip(tmp_path, fmt, pickled, widths):
    original = concept("<my-thing>", widths, n=3)
    files = ef.write(original, tmp_path / "out", fmt, torch_pickle=pickled)
    assert all(f.suffix == (".safetensors" if not pickled else ".bin" if fmt == "diffusers" else ".pt") for f in files)
    # Named after the token, the word front-ends take from the file name.
    assert (files[0].parent.name if fmt == "diffusers" else files[0].stem) == "my-thing"
    # A folder read and a file read agree; SDXL diffusers exports are the two-file form.
    for source in (tmp_path / "out", files[0], files[-1]):
        (back,) = ef.read(source)
        assert_same(original, back)
        # kohya .pt and SDXL .pt are keyed by fixed names and carry no metadata: the file name is the token.
        plain_keyed = pickled and (fmt == "kohya" or (fmt == "a1111" and len(widths) == 2))
        assert back.token == ("my-thing" if plain_keyed else "<my-thing>")
    if fmt == "diffusers":
        assert [f.name for f in files] == [f"learned_embeds{files[0].suffix}", f"learned_embeds_2{files[0].suffix}"][
            : len(widths)
        ]


def test_file_contents_match_the_published_layouts(tmp_path):
    sd = concept("<tok>", (768,), n=2)
    xl = concept("<tok>", (768, 1280), n=2)
    (f,) = ef.write(sd, tmp_path / "a.safetensors", "diffusers")
    assert set(load_file(f)) == {"<tok>"}
    from safetensors import safe_open

    with safe_open(f, "np") as h:  # diffusers' format tag, then what tix knows (nothing yet of this concept's making)
        assert h.metadata() == {"format": "pt", "token": "<tok>", "vectors": "2", "tix_version": tix.__version__}
    f1, f2 = ef.write(xl, tmp_path / "learned_embeds-steps-500.safetensors", "diffusers")
    assert f2.name == "learned_embeds_2-steps-500.safetensors"
    assert load_file(f1)["<tok>"].shape == (2, 768) and load_file(f2)["<tok>"].shape == (2, 1280)
    assert ef.read(f2)[0].is_sdxl
    # Overwriting an SDXL pair with an SD 1/2 concept drops the stale second file, which would pair with it.
    ef.write(sd, f1, "diffusers")
    assert not f2.exists() and not ef.read(f1)[0].is_sdxl
    (k,) = ef.write(sd, tmp_path / "k.safetensors", "kohya")
    assert set(load_file(k)) == {"emb_params"}
    (kx,) = ef.write(xl, tmp_path / "kx.safetensors", "kohya")
    loaded = load_file(kx)
    assert {n: v.shape for n, v in loaded.items()} == {"clip_l": (2, 768), "clip_g": (2, 1280)}

    import torch

    made = ef.Provenance(steps=1500, model="v1-5", model_hash="abcdef1234")
    (a,) = ef.write(ef.Concept("<tok>", sd.vectors, made), tmp_path / "a1", "a1111", torch_pickle=True)
    assert a.name == "tok.pt"
    data = torch.load(a, weights_only=True)
    assert data["string_to_token"] == {"*": 265} and data["name"] == "<tok>" and data["step"] == 1500
    assert data["sd_checkpoint"] == "abcdef1234" and data["sd_checkpoint_name"] == "v1-5"
    np.testing.assert_array_equal(data["string_to_param"]["*"].numpy(), sd.vectors["text_encoder"])
    assert ef.read(a)[0].provenance == made
    with pytest.raises(TixError, match="contradicts"):
        ef.write(sd, tmp_path / "x.pt", "kohya", torch_pickle=False)


@pytest.mark.parametrize("widths", [(768,), (768, 1280)], ids=["sd", "sdxl"])
def test_provenance_travels_where_the_format_has_a_place(tmp_path, widths):
    made = ef.Provenance(steps=400, model="stable-diffusion-v1-5", model_hash="0123456789abcdef")
    c = ef.Concept("<my-heart>", concept("x", widths).vectors, made)
    for fmt in ef.FORMATS:
        for pickled in (False, True):
            files = ef.write(c, tmp_path / f"{fmt}-{pickled}", fmt, torch_pickle=pickled)
            (back,) = ef.read(files[0])
            # Pickles other than A1111's SD 1/2 .pt must hold their tensors alone (front-ends refuse extra keys).
            has_place = not pickled or (fmt == "a1111" and len(widths) == 1)
            assert back.provenance == (made if has_place else ef.Provenance()), (fmt, pickled)
            if not pickled:
                from safetensors import safe_open

                with safe_open(files[-1], "np") as h:
                    meta = h.metadata()
                assert meta == {"format": "pt", "token": "<my-heart>", "vectors": "2", "steps": "400",
                                "model": "stable-diffusion-v1-5", "model_hash": "0123456789abcdef",
                                "tix_version": tix.__version__}
    with pytest.raises(TixError, match="non-negative int"):
        ef.Provenance(steps=-1)


def test_name_picks_the_file_name(tmp_path):
    c = concept("<my-heart>", (8,))
    assert ef.write(c, tmp_path, "kohya")[0] == tmp_path / "my-heart.safetensors"
    assert ef.write(c, tmp_path, "a1111", name="heart", torch_pickle=True)[0] == tmp_path / "heart.pt"
    assert ef.write(c, tmp_path, "diffusers")[0] == tmp_path / "my-heart" / "learned_embeds.safetensors"
    assert ef.write(c, tmp_path, "diffusers", name="h2")[0] == tmp_path / "h2" / "learned_embeds.safetensors"
    # Two diffusers exports in one folder no longer collide.
    assert {x.token for x in ef.read(tmp_path / "my-heart")} == {"<my-heart>"}
    with pytest.raises(TixError, match="e.g. 'a_b'"):
        ef.write(c, tmp_path, "kohya", name="a/b")
    with pytest.raises(TixError, match="one concept"):
        ef.write([c, concept("<b>", (8,))], tmp_path, "kohya", name="x")
    with pytest.raises(TixError, match="both the path"):
        ef.write(c, tmp_path / "f.safetensors", "kohya", name="x")


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_files_get_the_umask_mode(tmp_path, umask):
    from tix import fs

    old = os.umask(umask)
    try:
        files = ef.write([concept("<a>", (8, 12)), concept("<b>", (8, 12))], tmp_path / "d", "diffusers")
        files += ef.write(concept("<c>", (8,)), tmp_path / "k", "a1111", torch_pickle=True)
        files.append(fs.write_text(tmp_path / "report.html", "<p>"))
        files += ef.write(concept("<a>", (8, 12)), tmp_path / "d", "diffusers")  # replacing files: the same rule
        plain = tmp_path / "plain"
        plain.write_bytes(b"")  # what open() gives, for comparison
    finally:
        os.umask(old)
    assert len(files) == 8
    for f in files:
        assert os.stat(f).st_mode & 0o777 == 0o666 & ~umask == os.stat(plain).st_mode & 0o777, f
    assert not [p for p in tmp_path.rglob(".*.tmp")]


# ---------------------------------------------------------------------------------------------------------------------
# PyTorch diffusers loads the exports


@pytest.fixture(scope="module")
def pipelines(tiny_dirs):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cache = {}

    def get(kind):
        if kind not in cache:
            cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
            cache[kind] = cls.from_pretrained(tiny_dirs(kind))
        return cache[kind]

    return get


def rows(tokenizer, text_encoder, token: str, n: int) -> np.ndarray:
    names = [token] + [f"{token}_{i}" for i in range(1, n)]
    ids = tokenizer.convert_tokens_to_ids(names)
    assert all(i >= 0 and i != tokenizer.unk_token_id for i in ids)
    return text_encoder.get_input_embeddings().weight.detach()[ids].numpy()


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_diffusers_loads_sd_exports(tmp_path, pipelines, kind):
    pipe = pipelines(kind)
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    cases = [  # (format, torch_pickle, n, pass token= to diffusers)
        ("diffusers", False, 3, False),
        ("diffusers", True, 1, False),
        ("a1111", True, 2, False),  # diffusers takes the token from the .pt's "name"
        ("a1111", False, 2, True),
        ("kohya", False, 3, True),
        ("kohya", True, 1, True),
    ]
    for fmt, pickled, n, pass_token in cases:
        token = f"<{kind}-{fmt}-{int(pickled)}>"
        c = concept(token, (width,), n=n)
        files = ef.write(c, tmp_path / token.strip("<>"), fmt, torch_pickle=pickled)
        source = files[0].parent if fmt == "diffusers" else files[0]
        pipe.load_textual_inversion(str(source), token=token if pass_token else None)
        np.testing.assert_array_equal(rows(pipe.tokenizer, pipe.text_encoder, token, n), c.vectors["text_encoder"])
    assert pipe.maybe_convert_prompt(f"a <{kind}-kohya-0> cat", pipe.tokenizer) == (
        f"a <{kind}-kohya-0> <{kind}-kohya-0>_1 <{kind}-kohya-0>_2 cat"
    )


def test_diffusers_loads_sdxl_exports(tmp_path, pipelines):
    import torch
    from safetensors.torch import load_file as load_torch

    pipe = pipelines("sdxl")
    widths = tuple(te.get_input_embeddings().weight.shape[1] for te in (pipe.text_encoder, pipe.text_encoder_2))
    encoders = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
    for fmt, pickled in [("kohya", False), ("a1111", False), ("a1111", True), ("diffusers", False)]:
        token = f"<xl-{fmt}-{int(pickled)}>"
        c = concept(token, widths, n=2)
        files = ef.write(c, tmp_path / token.strip("<>"), fmt, torch_pickle=pickled)
        if fmt == "diffusers":
            folder = files[0].parent
            pipe.load_textual_inversion(str(folder))
            pipe.load_textual_inversion(str(folder), weight_name="learned_embeds_2.safetensors",
                                        tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2)
        else:
            state = torch.load(files[0], weights_only=True) if pickled else load_torch(files[0])
            for key, (tokenizer, text_encoder) in zip(("clip_l", "clip_g"), encoders, strict=True):
                pipe.load_textual_inversion(state[key], token=token, tokenizer=tokenizer, text_encoder=text_encoder)
        for name, (tokenizer, text_encoder) in zip(ef.ENCODERS, encoders, strict=True):
            np.testing.assert_array_equal(rows(tokenizer, text_encoder, token, 2), c.vectors[name])


# ---------------------------------------------------------------------------------------------------------------------
# Foreign files


def test_reads_paper_and_a1111_pickles(tmp_path):
    import torch

    vec = torch.randn(2, 32)
    # The paper's code pickles an nn.ParameterDict.
    paper = {"string_to_token": {"*": torch.tensor(265)},
             "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vec.clone())})}
    torch.save(paper, tmp_path / "embeddings_gs-6099.pt")
    (c,) = ef.read(tmp_path / "embeddings_gs-6099.pt", token="*sculpture")
    assert c.token == "*sculpture"
    np.testing.assert_array_equal(c.vectors["text_encoder"], vec.numpy())
    assert ef.read(tmp_path / "embeddings_gs-6099.pt")[0].token == "embeddings_gs-6099"  # no name: the file's
    # A1111 saves its training tensor, grad flag included; early versions ran on torch's legacy (non-zip) format.
    a1111 = {"string_to_token": {"*": 265}, "string_to_param": {"*": vec.clone().requires_grad_(True)},
             "name": "myname", "step": 10, "sd_checkpoint": None, "sd_checkpoint_name": None}
    torch.save(a1111, tmp_path / "whatever.pt")
    torch.save(a1111, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("whatever.pt", "legacy.pt"):
        (c,) = ef.read(tmp_path / name)
        assert c.token == "myname"
        np.testing.assert_array_equal(c.vectors["text_encoder"], vec.numpy())
    # A module other than the paper's ParameterDict is not data.
    torch.save({"string_to_param": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")
    with pytest.raises(TixError, match="refusing"):
        ef.read(tmp_path / "module.pt")
    # Raw tensors need a token.
    torch.save(vec.half(), tmp_path / "raw.bin")
    with pytest.raises(TixError, match="token="):
        ef.read(tmp_path / "raw.bin")
    (c,) = ef.read(tmp_path / "raw.bin", token="<raw>")
    np.testing.assert_array_equal(c.vectors["text_encoder"], vec.half().float().numpy())


def test_reads_flax_example_npy(tmp_path):
    import jax.numpy as jnp

    vec = rng.standard_normal(768).astype(np.float32)
    # What diffusers' Flax script does: jnp.save of {token: device_get(row)}.
    jnp.save(tmp_path / "learned_embeds.npy", {"<flax-tok>": vec})
    for source in (tmp_path / "learned_embeds.npy", tmp_path):
        (c,) = ef.read(source)
        assert c.token == "<flax-tok>" and c.vectors["text_encoder"].shape == (1, 768)
        np.testing.assert_array_equal(c.vectors["text_encoder"][0], vec)
    big_endian = {"<be>": vec.astype(">f4")}
    np.save(tmp_path / "be.npy", big_endian)
    np.testing.assert_array_equal(ef.read(tmp_path / "be.npy")[0].vectors["text_encoder"][0], vec)
    np.save(tmp_path / "plain.npy", vec[None])
    (c,) = ef.read(tmp_path / "plain.npy", token="<p>")
    np.testing.assert_array_equal(c.vectors["text_encoder"][0], vec)


def test_reads_a1111_png(tmp_path):
    from PIL import Image, PngImagePlugin

    vec = rng.standard_normal((2, 32)).astype(np.float32)
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": {"TORCHTENSOR": vec.tolist()}},
            "name": "pngname", "step": 3}
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(json.dumps(data).encode()).decode())
    Image.new("RGB", (8, 8)).save(tmp_path / "e.png", pnginfo=info)
    (c,) = ef.read(tmp_path / "e.png")
    assert c.token == "pngname"
    np.testing.assert_array_equal(c.vectors["text_encoder"], vec)  # JSON decimals round-trip float32 exactly
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(TixError, match="sd-ti-embedding"):
        ef.read(tmp_path / "plain.png")


def test_multi_vector_key_grouping_and_token_choice(tmp_path):
    v = rng.standard_normal((6, 16)).astype(np.float32)
    # diffusers tokenizer naming, [D] and [1, D] rows mixed; saved in kohya's fp16 save precision.
    save_file({"<t>": v[0], "<t>_1": v[1:2], "<t>_2": v[2]}, tmp_path / "d.safetensors")
    (c,) = ef.read(tmp_path / "d.safetensors")
    assert c.token == "<t>"
    np.testing.assert_array_equal(c.vectors["text_encoder"], v[:3])
    save_file({"tok2": v[2].astype(np.float16), "tok": v[0].astype(np.float16), "tok1": v[1].astype(np.float16)},
              tmp_path / "k.safetensors")
    (c,) = ef.read(tmp_path / "k.safetensors")
    assert c.token == "tok" and c.vectors["text_encoder"].dtype == np.float32
    np.testing.assert_array_equal(c.vectors["text_encoder"], v[:3].astype(np.float16).astype(np.float32))
    save_file({"<a>": v[0], "<a>_1": v[1], "<b>": v[3:5], "<c>": v[5]}, tmp_path / "many.safetensors")
    with pytest.raises(TixError, match=r"3 unrelated tokens: '<a>', '<b>', '<c>'; pass token="):
        ef.read(tmp_path / "many.safetensors")
    (c,) = ef.read(tmp_path / "many.safetensors", token="<b>")
    np.testing.assert_array_equal(c.vectors["text_encoder"], v[3:5])
    with pytest.raises(TixError, match="no token '<z>'"):
        ef.read(tmp_path / "many.safetensors", token="<z>")
    # A single-token diffusers file is renamed by token=, as diffusers' load_textual_inversion does.
    assert ef.read(tmp_path / "d.safetensors", token="<new>")[0].token == "<new>"
    import ml_dtypes

    save_file({"emb_params": v[:2].astype(ml_dtypes.bfloat16)}, tmp_path / "bf16.safetensors")
    (c,) = ef.read(tmp_path / "bf16.safetensors")
    assert c.token == "bf16"
    np.testing.assert_array_equal(c.vectors["text_encoder"], v[:2].astype(ml_dtypes.bfloat16).astype(np.float32))
    save_file({"clip_l": v[:2]}, tmp_path / "half.safetensors")
    with pytest.raises(TixError, match="clip_g"):
        ef.read(tmp_path / "half.safetensors")


def test_shapes_and_concept_validation():
    one = ef.Concept("t", {"text_encoder": np.ones(8, np.float64)})
    assert one.vectors["text_encoder"].shape == (1, 8) and one.vectors["text_encoder"].dtype == np.float32
    with pytest.raises(TixError, match="clip_l is text_encoder"):
        ef.Concept("t", {"clip_l": np.ones((1, 8))})
    with pytest.raises(TixError, match="different numbers of vectors"):
        ef.Concept("t", {"text_encoder": np.ones((2, 8)), "text_encoder_2": np.ones((3, 8))})
    with pytest.raises(TixError, match=r"\[D\] or \[n, D\]"):
        ef.Concept("t", {"text_encoder": np.ones((1, 2, 8))})


# ---------------------------------------------------------------------------------------------------------------------
# Safety


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickles_are_refused(tmp_path):
    import torch

    marker = tmp_path / "pwned"
    torch.save({"<x>": _Payload(marker)}, tmp_path / "evil.pt")
    torch.save({"<x>": _Payload(marker)}, tmp_path / "evil_legacy.pt", _use_new_zipfile_serialization=False)
    with (tmp_path / "evil.bin").open("wb") as f:
        pickle.dump({"<x>": _Payload(marker)}, f)
    np.save(tmp_path / "evil.npy", {"<x>": _Payload(marker)}, allow_pickle=True)
    for name in ("evil.pt", "evil_legacy.pt", "evil.bin", "evil.npy"):
        with pytest.raises(TixError, match="refusing to load .* may be malicious") as info:
            ef.read(tmp_path / name)
        if name != "evil.bin":
            assert "system" in str(info.value)
    assert not marker.exists()
    # The sanity check that the payload is live: plain pickle.load would have run it.
    with (tmp_path / "evil.bin").open("rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_without_torch(tmp_path, monkeypatch):
    c = concept("<t>", (8,))
    pt = ef.write(c, tmp_path / "a.pt", "a1111")[0]
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(TixError, match=r"install torch.*safetensors"):
        ef.read(pt)
    with pytest.raises(TixError, match=r"install torch.*safetensors"):
        ef.write(c, tmp_path / "b", "a1111", torch_pickle=True)  # A1111's native .pt
    with pytest.raises(TixError, match="torch_pickle=False"):
        ef.write(c, tmp_path / "c", "diffusers", torch_pickle=True)
    files = ef.write(c, tmp_path / "d", "a1111")  # the default needs no torch
    assert files[0].suffix == ".safetensors"
    assert_same(c, ef.read(files[0])[0])


NASTY = ["<../../x>", "../../x", "a/b", "a\\b", "nul\x00byte", "..", ".", "-rf", "CON", "cat", "CAT", "<cat>",
         "猫", "x" * 300, "/etc/passwd"]


@pytest.mark.parametrize("fmt", ef.FORMATS)
def test_tokens_cannot_escape_the_output_folder(tmp_path, fmt):
    out = tmp_path / "a" / "out"
    concepts = [concept(t, (8,), n=1) for t in NASTY]
    files = ef.write(concepts, out, fmt)
    assert len(files) == len(NASTY)
    names = [f.relative_to(out).parts[0] for f in files]
    assert len({n.lower() for n in names}) == len(names)
    for f, name in zip(files, names, strict=True):
        assert f.resolve().parent in (out.resolve(), out.resolve() / name)
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) and ".." not in name and len(name) <= 120
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["out"]
    # output_stems predicts the names the files get (the run's metrics and reports are keyed by it).
    stems = ef.output_stems(NASTY)
    assert all(n == s or n.startswith(s + ".") for n, s in zip(names, stems, strict=True)), (names, stems)
    assert ef.output_stems(["cat", "CAT", "<cat>"]) == ["cat", "CAT-2", "cat-3"]
    assert ef.safe_stem("CON") == "CON_"
    back = {c.token: c for c in ef.read(out)}
    assert sorted(back) == sorted(NASTY)  # safetensors metadata and A1111's "name" keep the original token
    for c in concepts:
        assert_same(c, back[c.token])


def test_atomic_write_keeps_previous_file(tmp_path, monkeypatch):
    old = concept("<t>", (8, 12))
    files = ef.write(old, tmp_path / "o", "diffusers")
    before = [f.read_bytes() for f in files]
    real = ef._dump_safetensors
    calls = []

    def failing(f, tensors, metadata):
        calls.append(1)
        if len(calls) == 2:  # the second file of the SDXL pair fails mid-write, after the first was serialized
            f.write(b"partial garbage")
            raise OSError("disk full")
        real(f, tensors, metadata)

    monkeypatch.setattr(ef, "_dump_safetensors", failing)
    with pytest.raises(OSError, match="disk full"):
        ef.write(concept("<t>", (8, 12)), tmp_path / "o", "diffusers")
    assert [f.read_bytes() for f in files] == before
    assert sorted(p.name for p in (tmp_path / "o" / "t").iterdir()) == ["learned_embeds.safetensors",
                                                                        "learned_embeds_2.safetensors"]
    assert_same(old, ef.read(tmp_path / "o")[0])

    (pt,) = ef.write(old_sd := concept("<s>", (8,)), tmp_path / "s.pt", "a1111")
    pt_before = pt.read_bytes()

    def failing_torch(f, obj):
        f.write(b"PK\x03\x04half")
        raise RuntimeError("serializer crashed")

    monkeypatch.setattr(ef, "_dump_torch", failing_torch)
    with pytest.raises(RuntimeError, match="serializer crashed"):
        ef.write(concept("<s>", (8,)), pt, "a1111")
    assert pt.read_bytes() == pt_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "s.pt"]
    assert_same(old_sd, ef.read(pt)[0])


def test_refuses_non_finite_vectors(tmp_path):
    bad = ef.Concept("<t>", {"text_encoder": np.array([[0.0, np.nan]])})
    with pytest.raises(TixError, match="NaN"):
        ef.write(bad, tmp_path / "x", "kohya")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Compatibility with a model


def test_check_compatible_names_both_sides():
    sd1, sd2, xl = concept("<a>", (768,)), concept("<b>", (1024,)), concept("<c>", (768, 1280))
    ef.check_compatible(sd1, {"text_encoder": 768}, "sd1")
    ef.check_compatible(sd2, {"text_encoder": 1024}, "sd2")
    ef.check_compatible(xl, {"text_encoder": 768, "text_encoder_2": 1280}, "sdxl")
    with pytest.raises(TixError, match=r"width 1024 \(as SD 2.x\).*width 768 \(as SD 1.x"):
        ef.check_compatible(sd2, {"text_encoder": 768}, "sd1")
    with pytest.raises(TixError, match=r"width 768 .*SD 2.x model's text_encoder has width 1024"):
        ef.check_compatible(sd1, {"text_encoder": 1024}, "sd2")
    with pytest.raises(TixError, match=r"SDXL embedding \(clip_l width 768, clip_g width 1280\).*SD 1.x"):
        ef.check_compatible(xl, {"text_encoder": 768}, "sd1")
    with pytest.raises(TixError, match=r"one text encoder only.*SDXL.*clip_l \(width 768\) and clip_g \(width 1280\)"):
        ef.check_compatible(sd1, {"text_encoder": 768, "text_encoder_2": 1280}, "sdxl")
    with pytest.raises(TixError, match=r"clip_g width 1280.*text_encoder_2 has width 1024"):
        ef.check_compatible(xl, {"text_encoder": 768, "text_encoder_2": 1024}, "sdxl")
    with pytest.raises(TixError, match="family"):
        ef.check_compatible(sd1, {"text_encoder": 768}, "sd3")
