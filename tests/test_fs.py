"""gs:// inputs and outputs through tix.fs, with no network: a fake bucket maps gs://NAME/... onto a local folder.

The fake intercepts the two places that would reach Google Cloud Storage:
- etils.epath (every tix.fs call and orbax's own file handling): `etils.epath.testing.mock_epath` sends each backend
  call to the local filesystem with gs:// rewritten to the fake bucket folder (epath would pick TensorFlow's gfile when
  TensorFlow is installed, which mock_epath does not cover, so that choice is turned off);
- orbax's array data, which TensorStore writes itself: orbax asks `gcs_utils.get_kvstore_for_gcs` for the GCS kvstore
  spec, and the fake returns a local `file` kvstore at the mapped folder instead. Orbax's bucket query (hierarchical
  namespace) answers "no".
Everything else runs as it would on GCS: orbax sees gs:// paths and takes its GCS path (writing in place and
committing with commit_success.txt instead of renaming), and tix takes its remote branches (whole-object writes,
buffered metrics, tensorboardX routed through tix.fs). Not covered: TensorStore's GCS driver, gcsfs / gfile talking
to a real bucket, and GCS's lack of real folders (the fake has them).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from pathlib import Path

import numpy as np
import pytest
from etils.epath import gpath
from etils.epath.testing import mock_epath
from orbax.checkpoint._src.path import gcs_utils
from PIL import Image

import tix
from tests.test_train import make_concept
from tix import embedding_files as ef
from tix import fs
from tix.cli import main
from tix.errors import TixError
from tix.library import Library


@contextlib.contextmanager
def fake_gcs(root: Path):
    """Serve gs://<bucket>/<key> from root/<bucket>/<key> for epath and orbax (see the module docstring)."""
    local_root = str(root)

    def local(p):
        s = os.fspath(p)
        return local_root + "/" + s[len("gs://"):] if s.startswith("gs://") else s

    def remote(s):
        s = os.fspath(s)
        return "gs://" + s[len(local_root) + 1:] if s.startswith(local_root + "/") else s

    def one(original, p, *args, **kwargs):
        return original(local(p), *args, **kwargs)

    def two(original, p, dst, *args, **kwargs):
        return original(local(p), local(dst), *args, **kwargs)

    def glob(original, pattern):
        return [remote(x) if pattern.startswith("gs://") else x for x in original(local(pattern))]

    def walk(original, top, **kwargs):
        for folder, dirs, files in original(local(top), **kwargs):
            yield (remote(folder) if os.fspath(top).startswith("gs://") else folder), dirs, files

    with contextlib.ExitStack() as stack:
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        patch.setattr(gpath, "_is_tf_installed", lambda: False)
        patch.setattr(gcs_utils, "get_kvstore_for_gcs", lambda p: {"driver": "file", "path": local(p)})
        patch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda p: False)
        # The client libraries a real bucket needs (gcsfs, google-cloud-storage) are what the fake replaces.
        patch.setattr(fs, "missing_packages", lambda p, checkpoints=False: [])
        stack.enter_context(mock_epath(
            open=one, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one, rmtree=one, stat=one,
            rename=two, replace=two, copy=two, glob=glob, walk=walk,
        ))
        yield


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """The fake GCS root (buckets are its subfolders); cwd is a clean folder so a path that escaped to a local
    relative path ("gs:/bucket/...") would show up in it."""
    root = tmp_path / "gcs"
    (root / "bucket").mkdir(parents=True)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    with fake_gcs(root):
        yield root
    assert not any(work.iterdir()), f"files written outside the fake bucket: {list(work.iterdir())}"



def no_temporaries(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.endswith(".tmp") or ".orbax-checkpoint-tmp" in p.name]


# ---------------------------------------------------------------------------------------------------------------------
# tix invert end to end on gs://


def test_invert_on_gs_end_to_end(bucket, tiny_dirs, capsys):
    make_concept(bucket / "bucket" / "cat", 0, n=3)
    main(["invert", "--model", str(tiny_dirs("sd1")), "--images", "gs://bucket/cat", "--token", "<cat>",
          "--init", "cat", "--out", "gs://bucket/run", "--steps", "4", "--batch-size", "2", "--save-every", "2",
          "--validate-every", "4", "--set", "validation_steps=2", "--set", "validation_seeds=1",
          "--set", "log_every=1"])
    printed = capsys.readouterr().out
    assert "gs://bucket/run/learned_embeds.safetensors" in printed

    run = bucket / "bucket" / "run"
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "report.html", "learned_embeds.safetensors"):
        assert (run / name).is_file(), name
    assert (run / "validation" / "step-000004" / "cat.png").is_file()
    assert "validation/step-000004/cat.png" in (run / "report.html").read_text()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # Orbax took its GCS path: steps written in place and committed with a marker file, the oldest one deleted.
    steps = sorted(p.name for p in (run / "checkpoints" / "wave-000").iterdir() if p.name.isdigit())
    assert steps == ["2", "4"]
    assert (run / "checkpoints" / "wave-000" / "4" / "commit_success.txt").is_file()
    assert no_temporaries(bucket) == []

    # Everything reads back through gs:// and agrees with the bytes in the bucket.
    (learned,) = ef.read("gs://bucket/run/learned_embeds.safetensors")
    (direct,) = ef.read(run / "learned_embeds.safetensors")
    assert learned.token == "<cat>"
    np.testing.assert_array_equal(learned.vectors["text_encoder"], direct.vectors["text_encoder"])
    from train.report import read_metrics

    rows = read_metrics("gs://bucket/run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)

    from train.checkpoint import Checkpoints

    ckpt = Checkpoints("gs://bucket/run/checkpoints/wave-000", keep=2)
    assert ckpt.latest() == 4
    state, meta = ckpt.restore()
    ckpt.close()
    assert meta["tokens"] == ["<cat>"] and int(state["step"]) == 4
    np.testing.assert_array_equal(np.asarray(state["vectors"][0])[0, :1], learned.vectors["text_encoder"])

    (entry,) = Library("gs://bucket/run/tokens").entries()
    assert entry.concept.token == "<cat>" and str(entry.path).startswith("gs://bucket/run/tokens/")
    np.testing.assert_array_equal(entry.concept.vectors["text_encoder"], learned.vectors["text_encoder"])

    # tix export and tix concepts read a gs:// run / library and write to gs://.
    main(["export", "gs://bucket/run", "--format", "a1111", "--torch-pickle", "--out", "gs://bucket/exports"])
    main(["export", str(entry.path), "--format", "kohya", "--out", "gs://bucket/one"])
    main(["concepts", "list", "gs://bucket/run/tokens"])
    printed = capsys.readouterr().out
    assert "gs://bucket/exports/cat.pt" in printed and "gs://bucket/one/cat.safetensors" in printed
    assert "<cat>\tsd1" in printed
    for exported in ("gs://bucket/exports", "gs://bucket/one/cat.safetensors"):
        (again,) = ef.read(exported)
        assert again.token == "<cat>"
        np.testing.assert_array_equal(again.vectors["text_encoder"], learned.vectors["text_encoder"])
    assert no_temporaries(bucket) == []

    # --init-from reads a gs:// file.
    from train.config import TrainConfig
    from train.invert import _init_from

    sd = tix.load(tiny_dirs("sd1"))
    cfg = TrainConfig(model=str(tiny_dirs("sd1")), images="gs://bucket/cat", token="<new>", out="gs://bucket/r2",
                      init_from="gs://bucket/run/learned_embeds.safetensors")
    starts = _init_from(sd, cfg, ["<new>"])
    np.testing.assert_array_equal(starts["<new>"].vectors["text_encoder"], learned.vectors["text_encoder"])

    # A second run into the same gs:// folder is refused unless resumed or overwritten, as locally.
    with pytest.raises(SystemExit):
        main(["invert", "--model", str(tiny_dirs("sd1")), "--images", "gs://bucket/cat", "--token", "<cat>",
              "--out", "gs://bucket/run", "--steps", "4"])
    assert "already holds a run" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Inputs


def test_concepts_folder_on_gs(bucket):
    from train import data
    from train.config import TrainConfig

    root = bucket / "bucket" / "concepts"
    make_concept(root / "dog", 1, n=2)
    (root / "dog" / "0.txt").write_text("a photo of <dog> on grass")
    (root / "dog" / "1.txt").write_text("<dog> asleep")
    make_concept(root / "style", 2, n=2)
    (root / "style" / "concept.yaml").write_text("style: true\ninit: painting\n")
    (root / ".hidden").mkdir()
    cfg = TrainConfig(model="unused", concepts="gs://bucket/concepts", out="gs://bucket/out", resolution=32)
    specs = data.concept_specs(cfg)
    assert [s.token for s in specs] == ["<dog>", "<style>"]
    dog, style = (data.resolve_concept(s, cfg) for s in specs)
    assert [str(p) for p in dog.images] == ["gs://bucket/concepts/dog/0.png", "gs://bucket/concepts/dog/1.png"]
    assert dog.per_image_captions and dog.prompts == ("a photo of {} on grass", "{} asleep")
    assert style.style and style.init == "painting"
    pixels, prompts, used = data.load_concept_pixels(dog, cfg, 32)
    assert pixels.shape == (2, 2, 32, 32, 3) and prompts == dog.prompts and used == list(dog.images)
    # The same pixels as the local files give.
    local = data.resolve_concept(data.ConceptSpec("<dog>", str(root / "dog")), cfg)
    np.testing.assert_array_equal(pixels, data.load_concept_pixels(local, cfg, 32)[0])


def test_missing_remote_paths_name_the_path(bucket, tiny_dirs, capsys):
    model = str(tiny_dirs("sd1"))
    with pytest.raises(SystemExit) as stop:
        main(["invert", "--model", model, "--images", "gs://bucket/no-such-folder", "--token", "<x>",
              "--init", "cat", "--out", "gs://bucket/run-missing", "--steps", "2"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "tix: error:" in err and "gs://bucket/no-such-folder" in err and "does not exist" in err
    with pytest.raises(SystemExit):
        main(["invert", "--model", model, "--concepts", "gs://other-bucket/concepts", "--out", "gs://bucket/r3",
              "--steps", "2"])
    assert "gs://other-bucket/concepts" in capsys.readouterr().err
    with pytest.raises(TixError, match="gs://bucket/none.safetensors"):
        ef.read("gs://bucket/none.safetensors")
    with pytest.raises(SystemExit):
        main(["export", "gs://bucket/empty", "--out", "gs://bucket/x"])
    assert "gs://bucket/empty" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Library on gs:// (orbax's commit-marker path)


def test_library_on_gs(bucket):
    lib = Library("gs://bucket/lib")
    a = ef.Concept("<a>", {"text_encoder": np.arange(64, dtype=np.float32).reshape(2, 32)})
    b = ef.Concept("<b>", {"text_encoder": -np.ones((1, 32), np.float32)})
    lib.add(a, {"family": "sd1"})
    folder_b = lib.add(b, {"family": "sd1"})
    assert str(folder_b).startswith("gs://bucket/lib/") and lib.is_entry(folder_b)
    assert [e.concept.token for e in lib.entries()] == ["<a>", "<b>"]
    with pytest.raises(TixError, match="already holds"):
        lib.add(a, {})

    # A save killed before its commit marker is invisible, and adding the concept again replaces it.
    local_b = bucket / "bucket" / "lib" / folder_b.name
    (local_b / "commit_success.txt").unlink()
    assert [e.concept.token for e in lib.entries()] == ["<a>"]
    lib.add(b, {"family": "sd1"})
    np.testing.assert_array_equal(lib.get("<b>").concept.vectors["text_encoder"], b.vectors["text_encoder"])

    lib.remove("<a>")
    assert [e.concept.token for e in lib.entries()] == ["<b>"]
    assert not any(p.name.startswith("a-") for p in (bucket / "bucket" / "lib").iterdir())

    other = Library("gs://bucket/lib2")
    assert other.merge(lib) == ["<b>"] and [e.concept.token for e in other.entries()] == ["<b>"]


# ---------------------------------------------------------------------------------------------------------------------
# tix.fs itself


def test_paths():
    assert fs.scheme("gs://b/x") == "gs" and fs.scheme("/tmp/x") is None and fs.scheme("rel/x") is None
    assert fs.is_remote("gs://b/x") and not fs.is_remote("C:/x")
    # pathlib collapses the scheme's double slash; fs.path restores it instead of writing to a local "gs:" folder.
    assert str(fs.path(pathlib.Path("gs://b/x/y"))) == "gs://b/x/y"
    assert str(fs.path("gs://b/x") / "y.png") == "gs://b/x/y.png"
    assert str(fs.absolute("gs://b/x")) == "gs://b/x"
    assert fs.absolute("rel").is_absolute() and str(fs.path("rel")) == "rel"


def test_missing_client_libraries_are_named(monkeypatch):
    monkeypatch.setattr(fs, "_installed", lambda module: False)
    with pytest.raises(TixError, match=r"gs://b/run: gs:// paths need gcsfs or tensorflow.*pip install 'tix\[gcs\]'"):
        fs.check_supported("gs://b/run")
    with pytest.raises(TixError, match="google.cloud.storage"):
        fs.check_supported("gs://b/run", checkpoints=True)
    fs.check_supported("/local/path", checkpoints=True)


def test_remote_failures_become_tix_errors():
    def denied(original, p, *args):
        if os.fspath(p).startswith("gs://"):
            raise PermissionError("403 caller does not have storage.objects.get access")
        return original(p, *args)

    with (pytest.MonkeyPatch.context() as patch,
          mock_epath(exists=denied, isdir=denied, open=denied)):
        patch.setattr(gpath, "_is_tf_installed", lambda: False)
        patch.setattr(fs, "missing_packages", lambda p, checkpoints=False: [])
        with pytest.raises(TixError, match="cannot read gs://b/x.png: PermissionError: 403"):
            fs.read_bytes("gs://b/x.png")
        with pytest.raises(TixError, match="gs://b/folder"):
            fs.is_dir("gs://b/folder")


def test_local_writes_are_atomic(tmp_path):
    target = tmp_path / "sub" / "a.bin"
    fs.write_bytes(target, b"old")
    good = tmp_path / "b.bin"

    # A failure on the second file leaves both destinations as they were and no temporary behind.
    with pytest.raises(TypeError):
        fs.write_files([(good, b"new"), (target, object())])
    assert target.read_bytes() == b"old" and not good.exists()
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["a.bin"]
    fs.write_files([(good, b"1"), (target, b"2")])
    assert good.read_bytes() == b"1" and target.read_bytes() == b"2"
    assert fs.read_text(fs.write_text(tmp_path / "t.txt", "héllo")) == "héllo"
    image = Image.new("RGB", (4, 3), (255, 0, 0))
    saved = fs.save_image(image, tmp_path / "i.png")
    with Image.open(fs.readable(saved)) as back:
        assert back.size == (4, 3) and back.getpixel((0, 0)) == (255, 0, 0)
    assert fs.size(saved) == saved.stat().length
