"""Compiling the step before training: the persistent compilation cache, `tix invert --compile-only`, the concepts per
step chosen from the compiled memory, and TPU slice targets (the names, and the error where libtpu is missing).

Every compile here is of one concept set (two concepts of different sizes, per-image tokens on, so every table of the
step has a size the concepts decide) and goes through one cache folder, so a shape compiled once is loaded after.
The compile for a real TPU topology needs libtpu, which CI lacks, so CI checks the error instead;
`benchmarks/tpu_plan.py --model tiny --target v5litepod-8` compiles for a slice where libtpu is installed.
"""

import dataclasses
import sys
from pathlib import Path

import jax
import pytest

from tests.test_train import make_concept
from tix.cli import main
from tix.errors import ConfigError
from train import compile_plan
from train.config import TrainConfig, load_config, parse_set


@pytest.fixture(scope="module")
def concepts(tmp_path_factory):
    root = tmp_path_factory.mktemp("concepts")
    make_concept(root / "a", 0, n=4)
    make_concept(root / "b", 5, n=3)
    (root / "b" / "concept.yaml").write_text("init: dog\nvectors: 2\n")
    return root


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The module's compilation cache (empty at first); afterwards the session's folder is in use again."""
    folder = tmp_path_factory.mktemp("compiled")
    yield folder
    compile_plan.enable_cache(None)


def config(model, concepts, out, **kw) -> TrainConfig:
    values = dict(model=str(model), concepts=str(concepts), init="cat", out=str(out), steps=2, batch_size=2,
                  per_image_tokens=True, validate_every=0)
    return TrainConfig(**{**values, **kw})


def invert_args(model, concepts, out, compiled, *extra):
    return ["invert", "--model", str(model), "--concepts", str(concepts), "--init", "cat", "--out", str(out),
            "--steps", "2", "--batch-size", "2", "--set", "per_image_tokens=true", "--set", f"compile_cache={compiled}",
            *extra]


def test_cache_folder_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_plan.cache_dir(None) == tmp_path / "xdg" / "tix" / "jax"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert compile_plan.cache_dir(None) == tmp_path / "jax"  # JAX's own setting, where the user made one
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_plan.cache_dir(None) == Path.home() / ".cache" / "tix" / "jax"
    for off in ("", "off", "OFF", False, "none"):
        assert compile_plan.cache_dir(off) is None
    assert compile_plan.cache_dir("~/elsewhere") == Path.home() / "elsewhere"
    # `--set compile_cache=` is an explicit empty value (cache off), not a flag left unset; `off` stays the word.
    assert parse_set(["compile_cache="]) == {"compile_cache": ""}
    assert parse_set(["compile_cache=off"]) == {"compile_cache": "off"}
    assert load_config(None, parse_set(["compile_cache="])).compile_cache == ""
    # Where compiled programs go is not what a run computes: a resumed run may move its cache.
    assert TrainConfig(compile_cache="/elsewhere").identity() == TrainConfig().identity()


def test_compile_only_reports_cost_and_memory_caches_the_step_and_writes_no_run(tmp_path, tiny_dirs, concepts,
                                                                                 compiled, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as done:
        main(invert_args(tiny_dirs("sd1"), concepts, out, compiled, "--set", "concepts_per_step=1",
                         "--compile-only"))
    assert done.value.code == 0
    line = capsys.readouterr().out.strip()
    assert "1 x cpu" in line and "2 images per step (1 concept)" in line, line
    assert "GFLOP per image" in line and "GB per device (no limit known)" in line, line
    assert not out.exists()  # a plan neither trains nor claims the run folder
    assert any(compiled.iterdir())  # the compiled step persisted for the next run with these shapes


def test_a_plan_without_a_flop_count_says_so_instead_of_printing_nan():
    uncounted = compile_plan.Plan("NVIDIA H200", 1, 4, float("nan"), 6_440_000_000, 112_600_000_000, 71.5, 1)
    assert "FLOPs not counted here" in uncounted.describe() and "nan" not in uncounted.describe().lower()
    assert "1380 GFLOP per image" in dataclasses.replace(uncounted, flops_per_image=1.3796e12).describe()
    assert uncounted.describe().endswith("6.44 GB per device (112.6 GB available): fits")


def _never_traced(*args, **kwargs):
    raise AssertionError("the train step was traced: its compiled executable was not loaded from the cache")


def test_a_second_run_loads_the_compiled_step_without_tracing_it_and_learns_the_same(tmp_path, tiny_dirs, concepts,
                                                                                      monkeypatch):
    """The executable in tix's disk cache is the one the first run compiled: the second run never traces the step
    (tracing raises here) and learns bit for bit the same vectors. Another learning rate traces the step again; a
    damaged entry is dropped."""
    import numpy as np

    from train import invert

    cache = tmp_path / "cache"
    cfg = config(tiny_dirs("sd1"), concepts, tmp_path / "first", compile_cache=str(cache), concepts_per_step=2)

    def same_as_first(result):
        assert result.vectors.keys() == first.vectors.keys()
        for token, vectors in first.vectors.items():
            for side, v in vectors.items():
                np.testing.assert_array_equal(result.vectors[token][side], v)

    first = invert.run(cfg, progress=False)
    (entry,) = cache.glob("step-*")
    monkeypatch.setattr(compile_plan, "train_step", _never_traced)
    same_as_first(invert.run(dataclasses.replace(cfg, out=str(tmp_path / "second")), progress=False))
    with pytest.raises(AssertionError, match="was traced"):  # the learning rate is part of the compiled step
        invert.run(dataclasses.replace(cfg, out=str(tmp_path / "third"), lr=cfg.lr * 2), progress=False)
    # A run of another length is the same program under a constant learning rate: the same entry, not traced.
    longer = invert.run(dataclasses.replace(cfg, out=str(tmp_path / "longer"), steps=cfg.steps + 1), progress=False)
    assert list(cache.glob("step-*")) == [entry]
    monkeypatch.undo()
    # A damaged entry is dropped and the step compiled again, here from JAX's own cache. A copy of an executable JAX
    # loaded would lack its kernels, so none is kept: such runs trace the step, load it from JAX's cache, and learn
    # the same.
    entry.write_bytes(b"torn")
    same_as_first(invert.run(dataclasses.replace(cfg, out=str(tmp_path / "fourth")), progress=False))
    assert not list(cache.glob("step-*"))
    again = invert.run(dataclasses.replace(cfg, out=str(tmp_path / "fifth"), steps=cfg.steps + 1), progress=False)
    for token, vectors in longer.vectors.items():
        for side, v in vectors.items():
            np.testing.assert_array_equal(again.vectors[token][side], v)
    compile_plan.enable_cache(None)


def test_a_plan_that_does_not_fit_says_so_and_exits_3(tmp_path, tiny_dirs, concepts, compiled, capsys,
                                                      monkeypatch):
    monkeypatch.setattr(compile_plan, "device_memory_limit", lambda: 1_000_000)  # a 1 MB device
    with pytest.raises(SystemExit) as done:  # the step the test above compiled, loaded from the cache
        main(invert_args(tiny_dirs("sd1"), concepts, tmp_path / "run", compiled, "--set", "concepts_per_step=1",
                         "--compile-only"))
    assert done.value.code == 3
    assert "(0.0 GB available): does NOT fit" in capsys.readouterr().out


def test_concepts_per_step_fill_the_memory_of_the_compiled_step(tmp_path, tiny_dirs, concepts, monkeypatch):
    """`tix invert` asks for the step at one and two concepts per device, each compiled once, and trains as many as
    fit; XLA's memory figures are stood in for (1000 bytes, and 100 per concept slot) to keep compiles out of this
    test: the step compiled from these shapes is checked above and below."""
    from train.invert import plan

    compiled_at = []

    def compile_from_shapes(sd, step_cfg, optimizer, shapes, mesh, bytes_limit, optimizer_settings=None):
        compiled_at.append(shapes.slots)
        images = shapes.slots * step_cfg.batch_size
        return compile_plan.Plan("cpu", 1, images, 1e9, 1000 + 100 * shapes.slots, bytes_limit, 0.0)

    monkeypatch.setattr(compile_plan, "plan", compile_from_shapes)

    def at(k=None, limit=None):
        monkeypatch.setattr(compile_plan, "device_memory_limit", lambda: limit)
        compiled_at.clear()
        return plan(config(tiny_dirs("sd1"), concepts, tmp_path / "run", concepts_per_step=k))

    assert at().concepts_per_step == 2 and compiled_at == [2]  # no limit known (CPU): up to 16, as before
    chosen = at(limit=int(1200 / 0.9) + 1)  # 90% of it holds two concepts
    assert (chosen.concepts_per_step, chosen.images_per_step, chosen.fits) == (2, 4, True)
    assert compiled_at == [1, 2]  # each size compiled once, the chosen one not again
    assert at(limit=int(1150 / 0.9)).concepts_per_step == 1
    assert at(2, limit=int(1150 / 0.9)).concepts_per_step == 2  # an explicit concepts_per_step always wins
    assert compiled_at == [2]


def test_a_plan_compiles_the_step_the_run_executes(tmp_path, tiny_dirs, concepts):
    """The abstract arguments lower to the same program as the run's real arrays, for every wave: a field of the
    tables missing from `abstract_args`, or a wave padded differently, would make a plan describe another step."""
    import tix
    from tix import parallel
    from train import invert
    from train.step import Layout
    from train.tables import step_shapes

    cfg = config(tiny_dirs("sd1"), concepts, tmp_path / "run", concepts_per_step=1)
    sd, resolution = invert._load(cfg, tix.load(cfg.model))
    prepared = invert.prepare_concepts(sd, cfg)
    step_cfg, optimizer = invert._step_settings(cfg, resolution)
    mesh = parallel.make_mesh()
    shapes = step_shapes(cfg, prepared, 1, mesh.devices.size)
    step_fn = compile_plan.step_function(sd, step_cfg, optimizer, Layout(mesh, shapes.sharded_tables))
    frozen = invert.place_frozen(sd, mesh)
    abstract = compile_plan.abstract_args(sd, shapes, resolution, optimizer, mesh)

    def signature(tree):
        return jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), tree)

    for wave in ([prepared[0]], [prepared[1]]):  # 4 images and 1 vector, then 3 images and 2 vectors
        state, tables, _ = invert.place_wave(sd, cfg, wave, shapes, resolution, mesh, optimizer)
        assert signature((state, frozen, tables)) == signature(abstract)
    assert step_fn.lower(state, frozen, tables).as_text() == step_fn.lower(*abstract).as_text()


@pytest.mark.parametrize("recorded", [8, 16])  # 16: every run folder from before the number was chosen
def test_a_resumed_run_keeps_the_concepts_per_step_it_started_with(tmp_path, concepts, recorded):
    from train.invert import _check_out

    (tmp_path / "run").mkdir()
    started = config("toyworld", concepts, tmp_path / "run", concepts_per_step=recorded)
    (tmp_path / "run" / "config.yaml").write_text(started.to_yaml())
    _, resumed = _check_out(config("toyworld", concepts, tmp_path / "run", resume=True))
    assert resumed.concepts_per_step == recorded  # not chosen again: the waves, so the checkpoints, depend on it
    with pytest.raises(ConfigError, match="changed: concepts_per_step"):
        _check_out(config("toyworld", concepts, tmp_path / "run", resume=True, concepts_per_step=4))
    _, fresh = _check_out(config("toyworld", concepts, tmp_path / "run", overwrite=True))
    assert fresh.concepts_per_step is None  # started again: chosen again


@pytest.mark.parametrize("bytes_one, bytes_two, limit, most, want", [
    (10, 12, 100, 1000, 4 * 41),  # 90% of 100: 10 bytes at one concept per device, 2 more each: 41 at 90
    (10, 12, 100, 33, 33),  # never more than there are concepts
    (95, 99, 100, 1000, 4),  # not even one per device fits: one per device, the run's fit check says the rest
    (10, 10, 100, 7, 7),  # no growth measured: all at once
])
def test_concepts_that_fit(bytes_one, bytes_two, limit, most, want):
    assert compile_plan.concepts_that_fit(bytes_one, bytes_two, 4, limit, most) == want


def test_concepts_per_step_is_chosen_only_where_there_is_a_choice():
    compiled_at = []

    def bytes_at(k):  # bytes per device: 1000 of weights, 100 per concept on the device (k over 4 devices)
        compiled_at.append(k)
        return 1000 + 100 * k // 4

    assert compile_plan.choose_concepts_per_step(40, 4, None, bytes_at) == 16  # CPU: the old default
    assert compile_plan.choose_concepts_per_step(3, 4, 10_000, bytes_at) == 3  # fewer concepts than devices
    assert compiled_at == []
    # per device: 1100 at one concept, 1200 at two; 9000 bytes hold 1 + (9000 - 1100) // 100 = 80 per device
    assert compile_plan.choose_concepts_per_step(1000, 4, 10_000, bytes_at) == 320
    assert compiled_at == [4, 8]


@pytest.mark.parametrize("name, topology, chips, gib", [
    ("v5litepod-8", "v5e:2x4", 8, 16), ("v5e-4", "v5e:2x2", 4, 16), ("v4-8", "v4:2x2x1", 4, 32),
    ("v4-32", "v4:2x2x4", 16, 32), ("v6e-8", "v6e:2x4", 8, 32), ("v5p-8", "v5p:2x2x1", 4, 95),
])
def test_tpu_slice_names(name, topology, chips, gib):
    s = compile_plan.tpu_slice(name)
    assert (s.topology, s.chips, s.bytes_per_chip) == (topology, chips, gib * 2**30)


@pytest.mark.parametrize("name, hint", [("v5litepod-7", "v5litepod-8"), ("h100-8", "v5litepod-N"),
                                        ("v4", "v4-N"), ("v4-9", "v4-8")])
def test_unknown_tpu_slices_are_refused_with_the_names_that_work(name, hint):
    with pytest.raises(ConfigError, match=hint):
        compile_plan.tpu_slice(name)


def test_target_without_libtpu_names_the_package_to_install(tmp_path, tiny_dirs, concepts, compiled, capsys,
                                                             monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # as on a machine without it: `import libtpu` fails
    with pytest.raises(SystemExit) as done:  # before the model is loaded
        main(invert_args(tiny_dirs("sd1"), concepts, tmp_path / "run", compiled, "--target", "v5litepod-8"))
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "tix: error: --target v5litepod-8" in err and "needs libtpu" in err, err
    assert f"pip install 'jax[tpu]=={jax.__version__}'" in err and "Traceback" not in err
