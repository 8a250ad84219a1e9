"""The concept library: add/list/get/remove/merge, provenance, the `tix concepts` and `tix export` commands, token names
that cannot escape the folder, and a writer killed mid-add leaving every finished concept readable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import tix
from tix import embedding_files as ef
from tix.errors import TixError
from tix.library import META_FIELDS, Library, add_run, model_name, run_provenance, table_hash

ROOT = Path(__file__).resolve().parent.parent


def vectors(i: int, widths: tuple[int, ...] = (32,)) -> dict[str, np.ndarray]:
    """Deterministic vectors for concept i (1-3 vectors), so another process can write what this one checks."""
    rng = np.random.default_rng(i)
    n = 1 + i % 3
    return {name: rng.standard_normal((n, w)).astype(np.float32) for name, w in zip(ef.ENCODERS, widths, strict=False)}


def concept(token: str, i: int, widths: tuple[int, ...] = (32,)) -> ef.Concept:
    return ef.Concept(token, vectors(i, widths))


def assert_same(a: ef.Concept, b: ef.Concept) -> None:
    assert a.token == b.token
    assert set(a.vectors) == set(b.vectors)
    for name in a.vectors:
        np.testing.assert_array_equal(a.vectors[name], b.vectors[name])


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "tix.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


# ---------------------------------------------------------------------------------------------------------------------
# Python API


def test_add_list_get_remove_merge(tmp_path):
    lib = Library(tmp_path / "lib")
    assert lib.entries() == []
    sd1, xl, multi = concept("<cat>", 0), concept("<xl-dog>", 1, (32, 48)), concept("<style>", 2, (768,))
    for c, family in ((sd1, "sd1"), (xl, "sdxl"), (multi, "sd1")):
        lib.add(c, {"family": family, "init": "cat", "steps": 7})

    entries = {e.concept.token: e for e in lib.entries()}
    assert sorted(entries) == ["<cat>", "<style>", "<xl-dog>"]
    for c in (sd1, xl, multi):
        got = entries[c.token]
        assert_same(got.concept, c)
        assert set(META_FIELDS) <= set(got.meta)
        assert got.meta["vectors"] == c.num_vectors and got.meta["steps"] == 7
        assert got.meta["tix_version"] == tix.__version__ and got.meta["date"]
        assert got.path.parent == lib.root
        assert_same(lib.get(c.token).concept, c)

    with pytest.raises(TixError, match="already holds '<cat>'"):
        lib.add(concept("<cat>", 5), {})
    assert_same(lib.get("<cat>").concept, sd1)  # the refused add changed nothing
    lib.add(concept("<cat>", 5), {"steps": 9}, replace=True)
    assert_same(lib.get("<cat>").concept, concept("<cat>", 5))
    assert lib.get("<cat>").meta["steps"] == 9

    lib.remove("<style>")
    assert sorted(e.concept.token for e in lib.entries()) == ["<cat>", "<xl-dog>"]
    with pytest.raises(TixError, match=r"no concept '<style>'.*<cat>"):
        lib.get("<style>")
    with pytest.raises(TixError, match="no concept"):
        lib.remove("<style>")

    other = Library(tmp_path / "other")
    other.add(concept("<cat>", 11), {"steps": 1})
    other.add(concept("<new>", 12), {"steps": 2, "init": "toy"})
    assert lib.merge(other) == ["<new>"]  # <cat> exists and is kept
    assert_same(lib.get("<cat>").concept, concept("<cat>", 5))
    assert lib.get("<new>").meta["init"] == "toy"
    assert lib.merge(other, replace=True) == ["<cat>", "<new>"]
    assert_same(lib.get("<cat>").concept, concept("<cat>", 11))
    assert len(other.entries()) == 2  # merge copies


def test_tokens_cannot_escape_the_library(tmp_path):
    lib = Library(tmp_path / "lib")
    tokens = ["<../../x>", "../..", "/etc/passwd", "a\\..\\b", "..", "CON", "<x>", "<X>", "<tmp-cat>", "\u00e9t\u00e9"]
    for i, token in enumerate(tokens):
        lib.add(concept(token, i), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib"]  # nothing written beside the library
    entries = lib.entries()
    assert sorted(e.concept.token for e in entries) == sorted(tokens)  # "<tmp-cat>" is not taken for a temp folder
    for e in entries:
        assert e.path.parent == lib.root
    for i, token in enumerate(tokens):
        assert_same(lib.get(token).concept, concept(token, i))
    lib.remove("<../../x>")
    assert "<../../x>" not in [e.concept.token for e in lib.entries()]


def test_unfinished_and_stray_folders_are_ignored(tmp_path):
    lib = Library(tmp_path / "lib")
    lib.add(concept("<a>", 0), {})
    (lib.root / "b-0123abcd.orbax-checkpoint-tmp" / "meta").mkdir(parents=True)  # an interrupted orbax save
    (lib.root / "b-0123abcd.orbax-checkpoint-tmp" / "vectors").mkdir()
    (lib.root / "notes").mkdir()
    (lib.root / "README.txt").write_text("hello")
    assert [e.concept.token for e in lib.entries()] == ["<a>"]


def test_add_run_records_provenance(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(bytes([i]) * 10)
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    sd = SimpleNamespace(
        source="some/model", kind="sd1", text=[SimpleNamespace(name="text_encoder")],
        params={"text_encoder": {"text_model": {"embeddings": {"token_embedding": {"embedding": table}}}}},
    )
    cfg = SimpleNamespace(steps=123, lr=5e-4)
    prepared = [SimpleNamespace(concept=SimpleNamespace(token="<thing>", init="cat", style=False,
                                                        images=sorted(images.iterdir())))]
    learned = {"<thing>": vectors(3)}
    add_run(tmp_path / "run" / "tokens", sd, cfg, prepared, learned)
    add_run(tmp_path / "run" / "tokens", sd, cfg, prepared, learned)  # a finished run re-exported replaces
    (entry,) = Library(tmp_path / "run" / "tokens").entries()
    assert_same(entry.concept, ef.Concept("<thing>", learned["<thing>"]))
    meta = entry.meta
    assert meta["base_model"] == "some/model" and meta["family"] == "sd1"
    assert meta["table_hash"] == {"text_encoder": table_hash(table)}
    assert meta["steps"] == 123 and meta["lr"] == 5e-4 and meta["init"] == "cat" and meta["style"] is False
    assert len(meta["images_hash"]) == 16
    assert table_hash(table) != table_hash(table + 1e-3)
    # What the run's own exports record is what its library entry says.
    assert run_provenance(sd, cfg) == entry.concept.provenance == ef.Provenance(123, "some/model", table_hash(table))

    # A local model folder is recorded by its absolute path, and exports name it by the folder's own name only.
    model = tmp_path / "models" / "my-sd15"
    model.mkdir(parents=True)
    os.chdir(tmp_path)
    try:
        local = SimpleNamespace(**{**vars(sd), "source": "models/my-sd15"})
        add_run(tmp_path / "run2", local, cfg, prepared, learned)
    finally:
        os.chdir(ROOT)
    (entry,) = Library(tmp_path / "run2").entries()
    assert entry.meta["base_model"] == str(model) and entry.concept.provenance.model == "my-sd15"
    assert model_name("stabilityai/stable-diffusion-2-1") == "stabilityai/stable-diffusion-2-1"
    assert model_name("gs://bucket/models/sd15") == "sd15" and model_name(None) is None


# ---------------------------------------------------------------------------------------------------------------------
# Commands


@pytest.fixture
def library(tmp_path):
    lib = Library(tmp_path / "lib")
    lib.add(concept("<cat>", 0), {"family": "sd1", "base_model": "/models/sd1-tiny", "steps": 250,
                                  "table_hash": {"text_encoder": "00ff00ff00ff00ff"}})
    lib.add(concept("<style>", 2), {"family": "sd1", "base_model": "tiny/sd1"})
    lib.add(concept("<xl>", 1, (32, 48)), {"family": "sdxl", "base_model": "tiny/sdxl"})
    return lib


def test_concepts_commands(library, tmp_path):
    listed = _cli("concepts", "list", library.root).stdout.splitlines()
    assert [line.split("\t")[0] for line in listed] == ["<cat>", "<style>", "<xl>"]
    assert "sdxl" in listed[2] and "2 vec" in listed[2] and "tiny/sdxl" in listed[2]

    shown = _cli("concepts", "show", library.root, "<xl>").stdout
    assert "token: <xl>" in shown and "family: sdxl" in shown
    assert "text_encoder: 2 x 32" in shown and "text_encoder_2: 2 x 48" in shown
    shown = _cli("concepts", "show", library.root, "<cat>").stdout
    assert "exports record: step 250, model sd1-tiny, model hash 00ff00ff00ff00ff" in shown

    assert "removed <style>" in _cli("concepts", "rm", library.root, "<style>").stdout
    assert [e.concept.token for e in library.entries()] == ["<cat>", "<xl>"]
    missing = _cli("concepts", "rm", library.root, "<style>", check=False)
    assert missing.returncode == 2 and "no concept '<style>'" in missing.stderr and "Traceback" not in missing.stderr

    other = Library(tmp_path / "other")
    other.add(concept("<dog>", 4), {"family": "sd1"})
    other.add(concept("<cat>", 9), {"family": "sd1"})
    assert "merged 1 concept(s)" in _cli("concepts", "merge", library.root, "--other", other.root).stdout
    assert_same(library.get("<cat>").concept, concept("<cat>", 0))
    assert "merged 2 concept(s)" in _cli("concepts", "merge", library.root, "--other", other.root,
                                         "--replace").stdout
    assert_same(library.get("<cat>").concept, concept("<cat>", 9))
    assert_same(library.get("<dog>").concept, concept("<dog>", 4))


def test_export_library_and_run(library, tmp_path):
    from tix.cli import main

    want = {e.concept.token: e.concept for e in library.entries()}
    # A whole library, one file (or diffusers folder) per concept, in each format; read back identical.
    for fmt in ("diffusers", "a1111", "kohya"):
        out = tmp_path / f"export-{fmt}"
        if fmt == "diffusers":
            printed = _cli("export", library.root, "--format", fmt, "--out", out).stdout.split()
        else:
            main(["export", str(library.root), "--format", fmt, "--out", str(out)])
            printed = [str(p) for p in out.rglob("*") if p.is_file()]
        assert printed and all(Path(p).is_file() and Path(p).resolve().is_relative_to(out) for p in printed)
        got = {c.token: c for c in ef.read(out)}
        assert sorted(got) == sorted(want)
        for token, c in want.items():
            assert_same(got[token], c)
    # Files named after the tokens (the word A1111 and ComfyUI prompts type), safetensors unless asked otherwise.
    assert sorted(p.name for p in (tmp_path / "export-a1111").iterdir()) == ["cat.safetensors", "style.safetensors",
                                                                             "xl.safetensors"]
    assert sorted(p.name for p in (tmp_path / "export-diffusers").iterdir()) == ["cat", "style", "xl"]

    # A run folder (its library is run/tokens) with --token, to a single file.
    run = tmp_path / "run"
    Library(run / "tokens").merge(library)
    out = tmp_path / "one.safetensors"
    assert _cli("export", run, "--format", "kohya", "--token", "<style>", "--out", out).stdout.split() == [str(out)]
    (got,) = ef.read(out)
    assert_same(got, want["<style>"])

    # One concept folder of a library.
    main(["export", str(library.get("<xl>").path), "--format", "kohya", "--out", str(tmp_path / "xl")])
    (got,) = ef.read(tmp_path / "xl")
    assert_same(got, want["<xl>"])

    nothing = _cli("export", tmp_path / "empty", "--out", tmp_path / "x", check=False)
    assert nothing.returncode == 2 and "no learned concepts" in nothing.stderr


def test_export_records_steps_and_model(library, tmp_path):
    """The library's provenance reaches every export with a place for it: A1111's .pt fields, safetensors metadata."""
    from safetensors import safe_open

    out = tmp_path / "a"
    proc = _cli("export", library.root, "--format", "a1111", "--token", "<cat>", "--torch-pickle", "--out", out)
    assert proc.stdout.split() == [str(out / "cat.pt")]
    assert "<cat>: type cat in AUTOMATIC1111, embedding:cat in ComfyUI" in proc.stderr
    import torch

    data = torch.load(out / "cat.pt", weights_only=True)
    assert (data["step"], data["sd_checkpoint_name"], data["sd_checkpoint"]) == (250, "sd1-tiny", "00ff00ff00ff00ff")
    assert ef.read(out / "cat.pt")[0].provenance == ef.Provenance(250, "sd1-tiny", "00ff00ff00ff00ff")

    # --name picks the file (and so the prompt word); diffusers goes into a folder of that name.
    (written,) = _cli("export", library.root, "--format", "diffusers", "--token", "<cat>", "--name", "kitty",
                      "--out", tmp_path / "d").stdout.split()
    assert written == str(tmp_path / "d" / "kitty" / "learned_embeds.safetensors")
    with safe_open(written, "np") as h:
        meta = h.metadata()
    assert meta["steps"] == "250" and meta["model"] == "sd1-tiny" and meta["model_hash"] == "00ff00ff00ff00ff"
    several = _cli("export", library.root, "--name", "x", "--out", tmp_path / "e", check=False)
    assert several.returncode == 2 and "one concept" in several.stderr and "Traceback" not in several.stderr


# ---------------------------------------------------------------------------------------------------------------------
# Crash safety

WRITER = """
import sys
import numpy as np
from tix.embedding_files import Concept, ENCODERS
from tix.library import Library

library, start, stop = Library(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
for i in range(start, stop):
    rng = np.random.default_rng(i)
    library.add(Concept(f"<c{i}>", {"text_encoder": rng.standard_normal((1 + i % 3, 768)).astype(np.float32)}),
                {"family": "sd1", "steps": i})
    print(i, flush=True)
"""


def _add_then_kill(root: Path, start: int, after: int, delay: float) -> int:
    """Start a process adding <c{start}>, <c{start+1}>, ...; SIGKILL it `delay` s after `after` adds finished."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(start), str(start + 200)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    done = []
    try:
        while len(done) < after:
            line = proc.stdout.readline()
            assert line, f"the writer exited early with {proc.wait()}"
            done.append(int(line))
        time.sleep(delay)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert done == list(range(start, start + after))
    return start + after


def _check_library(root: Path, at_least: int) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a half-written entry would be skipped with a warning: none may exist
        entries = Library(root).entries()
    tokens = {e.concept.token for e in entries}
    count = len(tokens)
    assert count >= at_least
    assert tokens == {f"<c{i}>" for i in range(count)}  # every earlier concept, and only finished ones
    for e in entries:
        i = int(e.concept.token[2:-1])
        rng = np.random.default_rng(i)
        np.testing.assert_array_equal(e.concept.vectors["text_encoder"],
                                      rng.standard_normal((1 + i % 3, 768)).astype(np.float32))
        assert e.meta["steps"] == i
    return count


def test_killed_writer_leaves_the_library_intact(tmp_path):
    root = tmp_path / "lib"
    reported = _add_then_kill(root, 0, after=5, delay=0.01)
    count = _check_library(root, reported)
    leftovers = sorted(p.name for p in root.iterdir() if p.name.endswith(".orbax-checkpoint-tmp"))
    print(f"first kill: {count} concepts intact, unfinished folders left: {leftovers}")
    # A second writer resumes where the first died (re-adding the concept it was killed in), and is killed too.
    reported = _add_then_kill(root, count, after=4, delay=0.03)
    count = _check_library(root, reported)
    print(f"second kill: {count} concepts intact")
    lib = Library(root)
    lib.add(ef.Concept(f"<c{count}>", {"text_encoder": np.zeros((1, 768), np.float32)}), {})
    assert len(lib.entries()) == count + 1
