"""Textual-inversion training on tiny pipelines: what changes, what must not, and that results are reproducible."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from PIL import Image

import tix
from tests.xla_flags import with_devices
from tix.embedding_files import read
from tix.errors import ConfigError, TixError
from tix.toyworld import world
from train.config import TrainConfig
from train.invert import run, summary
from train.report import read_metrics

ROOT = Path(__file__).resolve().parent.parent
FAST = dict(validate_every=0, save_every=1000, log_every=1, steps=6, batch_size=2)


def make_concept(folder: Path, index: int = 0, n: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    concept = world.benchmark_concepts()[index]
    for i, image in enumerate(world.concept_images(concept, n, seed=index)):
        Image.fromarray(image).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_concept(tmp_path_factory.mktemp("concept") / "thing")


def _cfg(tmp_path, model, images, **kw):
    values = dict(model=str(model), images=str(images), token="<thing>", init="cat", out=str(tmp_path / "run"), **FAST)
    values.update(kw)
    return TrainConfig(**values)


def _flat(tree):
    return [np.asarray(x).copy() for x in jax.tree.leaves(tree)]


def test_loss_falls_and_nothing_frozen_moves(tmp_path, tiny_dirs, images):
    sd = tix.load(tiny_dirs("sd1"))
    before = _flat(sd.params)
    cfg = _cfg(tmp_path, tiny_dirs("sd1"), images, steps=40, batch_size=4, lr=5e-3, seed=1)
    result = run(cfg, sd, progress=False)
    # Bitwise: every frozen weight, the whole CLIP table included (its original rows are never written).
    for a, b in zip(before, _flat(sd.params), strict=True):
        np.testing.assert_array_equal(a, b)
    # The loss on a fixed set of draws (images, timesteps, noise) is lower with the learned vector than the initial.
    before_loss, after_loss = fixed_draw_loss(sd, cfg, result)
    print(f"fixed-draw loss: initial {before_loss:.5f} -> learned {after_loss:.5f}")
    assert after_loss < before_loss
    # Optimizer state: Adam's two moments over exactly the learned vectors (plus scalar step counters).
    n_vectors = sum(v.size for v in result.state.vectors)
    moments = sum(x.size for x in jax.tree.leaves(result.state.opt_state) if np.ndim(x) > 0)
    assert moments == 2 * n_vectors
    assert result.state.vectors[0].shape == (1, 1, 32)
    # The learned vector moved away from its initializer, and the export holds it.
    exported = read(tmp_path / "run" / "learned_embeds.safetensors")[0]
    np.testing.assert_array_equal(exported.vectors["text_encoder"], result.vectors["<thing>"]["text_encoder"])
    init = np.asarray(sd.params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"])
    cat = sd.text[0].tokenizer("cat", add_special_tokens=False).input_ids[0]
    assert np.abs(exported.vectors["text_encoder"][0] - init[cat]).max() > 1e-4
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "report.html", "tokens"):
        assert (tmp_path / "run" / name).exists(), name
    # The learned vector's size against an ordinary word's: in the result, the summary, the log and the report.
    rows = np.linalg.norm(init, axis=-1)
    expected = np.linalg.norm(exported.vectors["text_encoder"][0]) / np.median(rows)
    np.testing.assert_allclose(result.norms["<thing>"], expected, rtol=1e-5)
    init_ratio = np.linalg.norm(init[cat]) / np.median(rows)
    assert abs(result.norms["<thing>"] - init_ratio) > 1e-3  # it moved with the vector
    assert f"{expected:.1f}x an ordinary word's norm" in summary(result)
    logged = [r["norm_vs_words/thing"] for r in read_metrics(tmp_path / "run") if "norm_vs_words/thing" in r]
    assert logged and abs(logged[-1] - expected) < 1e-4
    assert f"vectors {logged[-1]:.1f}x the norm of an ordinary word" in (tmp_path / "run" / "report.html").read_text()


def fixed_draw_loss(sd, cfg, result, draws=8):
    """Mean loss over `draws` fixed step keys, for the initial and the learned vectors."""
    from train.invert import prepare_concepts
    from train.step import StepConfig, loss_fn
    from train.tables import initial_vectors, step_shapes, wave_tables

    fresh = tix.load(cfg.model)
    prepared = prepare_concepts(fresh, cfg)
    tables, _ = wave_tables(fresh, cfg, prepared, step_shapes(cfg, prepared, 1, 1), fresh.default_size, range(1))
    tables = jax.tree.map(jax.numpy.asarray, tables)
    init = initial_vectors(fresh, prepared, 1, 1)
    step_cfg = StepConfig(16, 1, 0.5, None, None, fresh.default_size)
    fn = jax.jit(lambda v, k: loss_fn(v, fresh, step_cfg, fresh.params, tables, k)[0])
    learned = tuple(np.asarray(v) for v in result.state.vectors)
    mean = lambda v: float(np.mean([fn(v, 10_000 + i) for i in range(draws)]))
    return mean(tuple(init)), mean(learned)


def test_concepts_together_match_separate_runs(tmp_path, tiny_dirs):
    root = tmp_path / "concepts"
    make_concept(root / "a", 0)
    make_concept(root / "b", 5)
    (root / "b" / "concept.yaml").write_text("init: dog\nvectors: 2\n")
    common = dict(model=str(tiny_dirs("sd1")), init="cat", seed=3, **FAST)
    together = run(TrainConfig(concepts=str(root), out=str(tmp_path / "both"), **common), progress=False)
    alone_a = run(TrainConfig(images=str(root / "a"), token="<a>", out=str(tmp_path / "a"), **common), progress=False)
    alone_b = run(TrainConfig(images=str(root / "b"), token="<b>", vectors=2, out=str(tmp_path / "b"),
                              **{**common, "init": "dog"}), progress=False)
    # One concept per step: two waves through the same compiled step.
    waves = run(TrainConfig(concepts=str(root), out=str(tmp_path / "waves"), concepts_per_step=1, **common),
                progress=False)
    assert (together.waves, waves.waves) == (1, 2)
    for token, alone in (("<a>", alone_a), ("<b>", alone_b)):
        want = alone.vectors[token]["text_encoder"]
        for how, result in (("together", together), ("in waves", waves)):
            got = result.vectors[token]["text_encoder"]
            assert got.shape == want.shape
            rel = np.abs(got - want).max() / np.abs(want).max()
            print(f"{token}: {how} vs alone max relative {rel:.2e}")
            assert rel < 1e-5


def _cli(args, env=None, **kw):
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "tix.cli", *args], env=full, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _invert_args(model, images, out, steps, save_every=1000):
    return ["invert", "--model", str(model), "--images", str(images), "--token", "<thing>", "--init", "cat",
            "--out", str(out), "--steps", str(steps), "--batch-size", "4", "--save-every", str(save_every),
            "--validate-every", "0", "--seed", "7"]


def _vectors(run_dir):
    return read(Path(run_dir) / "learned_embeds.safetensors")[0].vectors["text_encoder"]


def one_and_eight_devices(tmp_path, model, images, steps, extra=()) -> float:
    """The largest difference, relative to the largest value, between the vectors of the same CLI run on 1 and 8
    simulated devices."""
    outs = {}
    for n in (1, 8):
        proc = _cli([*_invert_args(model, images, tmp_path / f"d{n}", steps), *extra],
                    env={"XLA_FLAGS": with_devices(n), "JAX_PLATFORMS": "cpu"})
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
        outs[n] = _vectors(tmp_path / f"d{n}")
    return float(np.abs(outs[1] - outs[8]).max() / np.abs(outs[1]).max())


def test_one_and_eight_devices_agree(tmp_path, tiny_dirs, images):
    rel = one_and_eight_devices(tmp_path, tiny_dirs("sd1"), images, 8)
    print(f"1 vs 8 devices: max relative difference {rel:.2e}")
    assert rel < 1e-5


def _wait_for_checkpoint(run_dir: Path, proc, timeout=600):
    deadline = time.time() + timeout
    ckpt = run_dir / "checkpoints" / "wave-000"
    while time.time() < deadline:
        if ckpt.exists() and any(p.name.isdigit() for p in ckpt.iterdir()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before its first checkpoint: {proc.stdout.read()}")
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


RESUME_STEPS = 60


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_dirs, images):
    """The reference run the interrupted ones must reproduce bit for bit."""
    out_dir = tmp_path_factory.mktemp("ref") / "ref"
    ref = _cli(_invert_args(tiny_dirs("sd1"), images, out_dir, RESUME_STEPS))
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out
    return _vectors(out_dir)


@pytest.mark.parametrize("how", [signal.SIGINT])  # SIGKILL and SIGTERM: tests/test_faults.py, at chosen points
def test_interrupted_run_resumes_bitwise(tmp_path, tiny_dirs, images, how, uninterrupted):
    model = tiny_dirs("sd1")
    steps = RESUME_STEPS

    victim = _cli(_invert_args(model, images, tmp_path / "cut", steps, save_every=5))
    _wait_for_checkpoint(tmp_path / "cut", victim)
    victim.send_signal(how)
    out, _ = victim.communicate(timeout=600)
    if how == signal.SIGINT:
        assert victim.returncode == 130, out
        assert "--resume" in out
    assert not (tmp_path / "cut" / "learned_embeds.safetensors").exists(), "the run finished before the signal"

    resumed = _cli(_invert_args(model, images, tmp_path / "cut", steps, save_every=5) + ["--resume"])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    np.testing.assert_array_equal(_vectors(tmp_path / "cut"), uninterrupted)


@pytest.mark.parametrize("kind", ["sd2", "sdxl"])
def test_other_families_train(tmp_path, tiny_dirs, images, kind):
    sd = tix.load(tiny_dirs(kind))
    before = _flat(sd.params)
    cfg = _cfg(tmp_path, tiny_dirs(kind), images, steps=20, batch_size=4, lr=5e-3, seed=1)
    result = run(cfg, sd, progress=False)
    for a, b in zip(before, _flat(sd.params), strict=True):
        np.testing.assert_array_equal(a, b)
    vectors = result.vectors["<thing>"]
    assert set(vectors) == ({"text_encoder", "text_encoder_2"} if kind == "sdxl" else {"text_encoder"})
    cat = sd.text[0].tokenizer("cat", add_special_tokens=False).input_ids[0]
    for side in sd.text:  # every encoder's vector moved away from its initializer
        init = np.asarray(sd.params[side.name]["text_model"]["embeddings"]["token_embedding"]["embedding"])[cat]
        assert np.abs(vectors[side.name][0] - init).max() > 1e-3, side.name
    before_loss, after_loss = fixed_draw_loss(sd, cfg, result)
    print(f"{kind} fixed-draw loss: initial {before_loss:.5f} -> learned {after_loss:.5f}")
    assert after_loss < before_loss


def test_existing_run_folder_is_protected(tmp_path, tiny_dirs, images):
    run(_cfg(tmp_path, tiny_dirs("sd1"), images, steps=2), progress=False)
    saved = (tmp_path / "run" / "learned_embeds.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        run(_cfg(tmp_path, tiny_dirs("sd1"), images, steps=2), progress=False)
    with pytest.raises(ConfigError, match="different config"):
        run(_cfg(tmp_path, tiny_dirs("sd1"), images, steps=2, lr=1e-2, resume=True), progress=False)
    assert (tmp_path / "run" / "learned_embeds.safetensors").read_bytes() == saved
    # --overwrite, through the command line: the run starts again from scratch with the new config.
    from tix.cli import main

    main(_invert_args(tiny_dirs("sd1"), images, tmp_path / "run", 1) + ["--lr", "1e-2", "--overwrite"])
    assert TrainConfig(**yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())).lr == 1e-2
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "wave-000").iterdir() if p.name.isdigit())
    assert kept == ["1"]  # the old run's step-2 checkpoint is gone
    assert (tmp_path / "run" / "learned_embeds.safetensors").read_bytes() != saved


def test_bad_images_are_skipped_with_a_warning(tmp_path, tiny_dirs, images):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in images.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"not an image at all")
    (folder / "truncated.jpg").write_bytes((images / "0.png").read_bytes()[:40])
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 128))
    rgba.save(folder / "alpha.png")
    Image.new("L", (30, 40), 128).save(folder / "gray.webp")
    Image.new("CMYK", (36, 36), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    with pytest.warns(UserWarning) as caught:
        run(_cfg(tmp_path, tiny_dirs("sd1"), folder, steps=1), progress=False)
    text = " ".join(str(w.message) for w in caught)
    assert "broken.png" in text and "truncated.jpg" in text
    assert "alpha.png" not in text and "gray.webp" not in text and "cmyk.jpg" not in text


def test_exif_orientation_is_honoured(tmp_path):
    from train.data import load_image

    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotated 90 degrees
    image.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (20, 40)


def test_bad_inputs_name_the_problem(tmp_path, tiny_dirs, images):
    model = tiny_dirs("sd1")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.png").write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(TixError, match="no usable image"):
        run(_cfg(tmp_path, model, empty, out=str(tmp_path / "r1")), progress=False)
    with pytest.raises(TixError, match="already in the text_encoder vocabulary"):
        run(_cfg(tmp_path, model, images, token="cat", out=str(tmp_path / "r2")), progress=False)
    with pytest.raises(ConfigError, match="not a single token"):
        run(_cfg(tmp_path, model, images, init="zebracorn", out=str(tmp_path / "r3")), progress=False)
    with pytest.raises(ConfigError, match="multiple of"):
        run(_cfg(tmp_path, model, images, resolution=30, out=str(tmp_path / "r4")), progress=False)
    with pytest.raises(ConfigError, match="batch_size"):
        run(_cfg(tmp_path, model, images, batch_size=0, out=str(tmp_path / "r5")), progress=False)


def test_more_initializer_words_than_vectors_start_from_their_means(tiny_dirs):
    import tix
    from tix.models.clip import token_table
    from train.invert import init_vectors

    sd = tix.load(tiny_dirs("sdxl"))
    words = ["red", "cat", "dog"]
    for side, one, two, cycled in zip(sd.text, init_vectors(sd, "red cat dog", 1), init_vectors(sd, "red cat dog", 2),
                                      init_vectors(sd, "red cat", 3), strict=True):
        table = np.asarray(token_table(sd.params[side.name]), np.float32)
        rows = {w: table[side.tokenizer(w, add_special_tokens=False).input_ids[0]] for w in words}
        np.testing.assert_allclose(one[0], (rows["red"] + rows["cat"] + rows["dog"]) / 3, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(two, [(rows["red"] + rows["cat"]) / 2, rows["dog"]], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(cycled, [rows["red"], rows["cat"], rows["red"]])


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, tiny_dirs, images):
    # An absurd learning rate sends the vectors to ~1e38 after one step; the next loss is not finite.
    with pytest.raises(TixError, match=r"loss became .* at step \d+"):
        run(_cfg(tmp_path, tiny_dirs("sd1"), images, steps=30, save_every=1, lr=1e38, scale_lr=False,
                 out=str(tmp_path / "nan")), progress=False)
    kept = sorted(int(p.name) for p in (tmp_path / "nan" / "checkpoints" / "wave-000").iterdir() if p.name.isdigit())
    from train.checkpoint import Checkpoints

    assert kept, "the last good checkpoint is gone"
    for step in kept:
        state, _ = Checkpoints(tmp_path / "nan" / "checkpoints" / "wave-000", 3).restore(None, step)
        assert all(np.isfinite(np.asarray(v)).all() for v in state["vectors"])


def test_init_from_an_embedding_file(tmp_path, tiny_dirs, images):
    from tix.embedding_files import Concept, write
    from train.invert import prepare_concepts

    sd = tix.load(tiny_dirs("sd1"))
    start = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    write(Concept("<old-name>", {"text_encoder": start}), tmp_path / "start.pt", format="a1111")
    cfg = _cfg(tmp_path, tiny_dirs("sd1"), images, init_from=str(tmp_path / "start.pt"))
    (prepared,) = prepare_concepts(sd, cfg)
    assert prepared.concept.vectors == 3
    np.testing.assert_array_equal(prepared.init[0], start)
    np.testing.assert_array_equal(sd.text[0].extra, start)
    wrong = Concept("<w>", {"text_encoder": np.zeros((1, 48), np.float32)})
    write(wrong, tmp_path / "wide.safetensors")
    with pytest.raises(TixError, match="48"):
        prepare_concepts(tix.load(tiny_dirs("sd1")), _cfg(tmp_path, tiny_dirs("sd1"), images,
                                                          init_from=str(tmp_path / "wide.safetensors")))


def test_a_step_that_cannot_fit_the_device_is_refused_before_training(tmp_path, tiny_dirs, images, monkeypatch):
    from train import compile_plan

    monkeypatch.setattr(compile_plan, "device_memory_limit", lambda: 1_000_000)  # a 1 MB device
    with pytest.raises(TixError, match=r"needs .* GB per device but the device has 0.0 GB.*remat"):
        run(_cfg(tmp_path, tiny_dirs("sd1"), images, steps=1), progress=False)
    assert not (tmp_path / "run" / "checkpoints" / "wave-000" / "1").exists()


def test_a_symlink_loop_among_the_images_is_skipped_up_front(tmp_path, tiny_dirs, images):
    folder = tmp_path / "looped"
    folder.mkdir()
    for p in images.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "a.png").symlink_to(folder / "b.png")
    (folder / "b.png").symlink_to(folder / "a.png")
    with pytest.warns(UserWarning, match=r"skipping .*a\.png: not a readable file"):
        result = run(_cfg(tmp_path, tiny_dirs("sd1"), folder, steps=1), progress=False)
    assert (tmp_path / "run" / "learned_embeds.safetensors").exists()  # the export (and its provenance) completes
    assert sorted(p.name for p in result.images_read) == sorted(p.name for p in images.iterdir())


def test_a_refused_run_leaves_no_trace_and_the_same_command_runs_once_fixed(tmp_path, tiny_dirs):
    folder = tmp_path / "later"
    folder.mkdir()
    cfg = _cfg(tmp_path, tiny_dirs("sd1"), folder, steps=1)
    with pytest.raises(TixError, match="no jpg, png or webp"):
        run(cfg, progress=False)
    assert not (tmp_path / "run").exists()
    make_concept(folder)
    run(cfg, progress=False)
    assert (tmp_path / "run" / "learned_embeds.safetensors").exists()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_checks_everything_first_and_leaves_nothing_of_the_old_run(tmp_path, tiny_dirs, images):
    model = tiny_dirs("sd1")
    root = tmp_path / "concepts"
    make_concept(root / "a", 0, n=2)
    make_concept(root / "b", 1, n=2)
    run(TrainConfig(model=str(model), concepts=str(root), init="cat", out=str(tmp_path / "run"), **FAST),
        progress=False)
    before = _snapshot(tmp_path / "run")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TixError, match="no jpg, png or webp"):
        run(_cfg(tmp_path, model, empty, overwrite=True), progress=False)
    assert _snapshot(tmp_path / "run") == before  # refused: the old run is whole
    run(_cfg(tmp_path, model, images, overwrite=True, steps=1), progress=False)
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert "embeddings" not in names and "learned_embeds.safetensors" in names  # only the new run's outputs
    from tix.library import Library

    assert [e.concept.token for e in Library(tmp_path / "run" / "tokens").entries()] == ["<thing>"]


def test_resume_accepts_the_same_image_folder_spelled_differently(tmp_path, tiny_dirs, images, monkeypatch):
    monkeypatch.chdir(images.parent)
    run(_cfg(tmp_path, tiny_dirs("sd1"), images.name, steps=1), progress=False)
    result = run(_cfg(tmp_path, tiny_dirs("sd1"), f"{images}/", steps=2, resume=True), progress=False)
    assert result.steps == 2
    with pytest.raises(ConfigError, match="changed: images"):  # a different folder is still refused
        run(_cfg(tmp_path, tiny_dirs("sd1"), str(tmp_path), steps=2, resume=True), progress=False)
