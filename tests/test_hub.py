"""Concepts from the Hugging Face Hub, read offline from a huggingface_hub cache the test lays out: tix and diffusers'
`load_textual_inversion` take the same files from the same cache and give the same text context."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import constants as hub_constants
from safetensors.numpy import save_file

import tix
from tix import embedding_files, hub
from tix.errors import TixError

ROOT = Path(__file__).resolve().parents[1]
REVISION = "0123456789abcdef0123456789abcdef01234567"
WIDTH = 32  # the tiny SD1's text width


def _snapshot(cache: Path, repo_id: str) -> Path:
    """huggingface_hub's cache layout: models--owner--name/{refs/main, snapshots/<revision>/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    folder = repo / "snapshots" / REVISION
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An offline Hub cache with an sd-concepts-library style repo (learned_embeds.bin + token_identifier.txt, plus
    concept images tix must not need) and a safetensors repo of two vectors."""
    cache = tmp_path / "hub"
    rng = np.random.default_rng(0)
    bin_repo = _snapshot(cache, "sd-concepts-library/cat-toy")
    cat = rng.standard_normal(WIDTH).astype(np.float32)
    torch.save({"<cat-toy>": torch.from_numpy(cat)}, bin_repo / "learned_embeds.bin")
    (bin_repo / "token_identifier.txt").write_text("<cat-toy>")
    (bin_repo / "type_of_concept.txt").write_text("object")
    st_repo = _snapshot(cache, "someone/two-vector-style")
    style = rng.standard_normal((2, WIDTH)).astype(np.float32)
    save_file({"<style>": style}, str(st_repo / "learned_embeds.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub read both variables when it was imported; the calls look them up in its constants.
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache, {"<cat-toy>": cat[None], "<style>": style}


def test_hub_ids_are_told_from_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.is_hub_id("sd-concepts-library/cat-toy")
    for path in ("./a/b", "/a/b", "~/a", "a/b/c", "gs://bucket/x", "plain.pt", "owner/"):
        assert not hub.is_hub_id(path), path
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / "cat.pt").write_bytes(b"")
    assert not hub.is_hub_id("emb/cat.pt")  # an existing relative path stays a path


def test_read_hub_concepts_offline(cache):
    _, vectors = cache
    (cat,) = embedding_files.read("sd-concepts-library/cat-toy")
    assert cat.token == "<cat-toy>"
    np.testing.assert_array_equal(cat.vectors["text_encoder"], vectors["<cat-toy>"])
    (style,) = embedding_files.read("someone/two-vector-style", token="<renamed>")
    assert style.token == "<renamed>" and style.vectors["text_encoder"].shape == (2, WIDTH)


def test_missing_hub_concept_is_a_clear_error(cache):
    with pytest.raises(TixError, match="no such local file or folder, and the Hugging Face Hub could not give it"):
        embedding_files.read("nobody/nothing")
    with pytest.raises(TixError, match="not a Hub id"):
        embedding_files.read("no/such/file.pt")


def test_same_context_as_diffusers_from_the_same_cache(cache, tiny_dirs):
    from diffusers import StableDiffusionPipeline

    folder = tiny_dirs("sd1")
    sd = tix.load(folder)
    assert sd.load_embeddings("sd-concepts-library/cat-toy") == ["<cat-toy>"]
    assert sd.load_embeddings("someone/two-vector-style") == ["<style>"]
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.load_textual_inversion("sd-concepts-library/cat-toy", local_files_only=True)
    pipe.load_textual_inversion("someone/two-vector-style", local_files_only=True)
    prompts = ["a photo of <cat-toy>", "a painting in the style of <style>", "<cat-toy> in <style>"]
    context, _ = sd.encode_prompts(prompts)
    with torch.no_grad():
        ref, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                    do_classifier_free_guidance=False)
    err = float(np.abs(np.asarray(context) - ref.numpy()).max())
    print(f"Hub concepts, tix vs diffusers load_textual_inversion: context max-abs {err:.2e}")
    assert err < 1e-4


def test_cli_exports_a_hub_concept_offline(cache, tmp_path):
    """`tix export owner/name` in a fresh process that sees only the environment variables."""
    hub_cache, vectors = cache
    out = tmp_path / "cat-toy.safetensors"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_CACHE=str(hub_cache), HF_HUB_OFFLINE="1",
               JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-m", "tix.cli", "export", "sd-concepts-library/cat-toy", "--format",
                          "a1111", "--out", str(out)], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (back,) = embedding_files.read(out)
    np.testing.assert_array_equal(back.vectors["text_encoder"], vectors["<cat-toy>"])
