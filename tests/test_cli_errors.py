"""Bad input answered by a tix error (exit 2, one line naming the problem), never a traceback: config values and files,
concept folders, images, prompts that cannot fit, and the generate / concepts / export arguments."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tix
from tix import cli
from tix.errors import ConfigError
from tix.library import Library
from train import data
from train.config import TrainConfig, load_config, parse_set


def _exit_2(argv: list[str], capsys) -> str:
    """Run the CLI in-process; it must stop with exit 2 and a one-line tix error. Returns the message."""
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    # The last line: transformers may log a line of its own while a model loads.
    assert err.strip().splitlines()[-1].startswith("tix: error:") and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------------------------------------
# Config values: --set, --config files, flags


def test_set_values_take_the_fields_type():
    got = parse_set(["lr=1e-3", "adam_eps=1e-6", "steps=2e3", "center_crop=no", "scale_lr=True", "init=yes",
                     "max_grad_norm=1", "prompts=a photo of {}"])
    assert got == {"lr": 1e-3, "adam_eps": 1e-6, "steps": 2000, "center_crop": False, "scale_lr": True, "init": "yes",
                   "max_grad_norm": 1.0, "prompts": ["a photo of {}"]}
    assert type(got["lr"]) is float and type(got["steps"]) is int and type(got["max_grad_norm"]) is float
    cfg = load_config(None, {"images": "x", "token": "<t>", **got})
    cfg.check()  # the converted values pass the checks that used to raise TypeError on strings
    assert cfg.lr == 1e-3


@pytest.mark.parametrize("item, words", [
    ("steps=abc", ["steps", "integer"]),
    ("steps=1.5", ["steps", "integer"]),
    ("center_crop=maybe", ["center_crop", "true or false"]),
    ("vectors=true", ["vectors", "integer"]),
    ("lr=fast", ["lr", "number"]),
    ("prompts={a: b}", ["prompts", "list of strings"]),
    ("no_such_field=1", ["no_such_field", "unknown config field"]),
])
def test_set_values_of_the_wrong_type_are_refused_naming_field_and_type(item, words, capsys):
    err = _exit_2(["invert", "--images", "x", "--token", "<t>", "--set", item], capsys)
    for word in words:
        assert word in err


def test_config_file_values_are_converted_or_refused_naming_the_file(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("lr: 1e-3\nsteps: '40'\ncenter_crop: off\n")
    cfg = load_config(good, {})
    assert (cfg.lr, cfg.steps, cfg.center_crop) == (1e-3, 40, False)
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 1e-3\ncenter_crop: maybe\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: center_crop must be true or false, not 'maybe'"):
        load_config(bad, {})


def test_malformed_config_yaml_names_file_and_line(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: 40\nlr: [1e-3\nseed: 0\n")
    err = _exit_2(["invert", "--config", str(broken), "--images", "x", "--token", "<t>"], capsys)
    assert "broken.yaml" in err and "line 3" in err and "not valid YAML" in err


@pytest.mark.parametrize("value", ["nan", "inf", "-1e-3", "0"])
def test_lr_must_be_a_positive_finite_number(value, capsys):
    err = _exit_2(["invert", "--images", "x", "--token", "<t>", f"--lr={value}"], capsys)
    assert "lr=" in err


@pytest.mark.parametrize("field, value", [("adam_eps", "nan"), ("adam_eps", "0"), ("weight_decay", "-1"),
                                          ("adam_b2", "1"), ("max_grad_norm", "inf"), ("flip_p", "nan")])
def test_other_optimizer_values_are_checked(field, value):
    cfg = load_config(None, {"images": "x", "token": "<t>", **parse_set([f"{field}={value}"])})
    with pytest.raises(ConfigError, match=field):
        cfg.check()


def test_a_misspelt_validation_sampler_is_refused_before_training(capsys):
    """Validation first samples after validate_every steps; a bad name must not wait until then."""
    err = _exit_2(["invert", "--images", "x", "--token", "<t>", "--set", "validation_sampler=dpm++2m-karas"], capsys)
    assert "validation_sampler='dpm++2m-karas'" in err and "dpm++2m-karras" in err
    cfg = load_config(None, {"images": "x", "token": "<t>", **parse_set(["validation_sampler=euler-karras"])})
    cfg.check()


# ---------------------------------------------------------------------------------------------------------------------
# Concept folders and images


def test_concept_folders_differing_only_in_case_are_refused(tmp_path):
    for name in ("Heart", "heart", "star"):
        (tmp_path / name).mkdir()
    cfg = TrainConfig(concepts=str(tmp_path))
    with pytest.raises(ConfigError, match=r"'Heart' and 'heart' differ only in case"):
        data.concept_specs(cfg)


def test_concept_yaml_values_are_typed_and_its_syntax_errors_located(tmp_path):
    folder = tmp_path / "cat"
    folder.mkdir()
    (folder / "concept.yaml").write_text("vectors: '2'\nstyle: no\n")
    (spec,) = data.concept_specs(TrainConfig(concepts=str(tmp_path)))
    assert (spec.vectors, spec.style) == (2, False)
    (folder / "concept.yaml").write_text("vectors: many\n")
    with pytest.raises(ConfigError, match=r"concept\.yaml: vectors must be an integer or null, not 'many'"):
        data.concept_specs(TrainConfig(concepts=str(tmp_path)))
    (folder / "concept.yaml").write_text("init: cat\ncaptions: ['a {}'\n")
    with pytest.raises(ConfigError, match=r"concept\.yaml, line \d+ column \d+: not valid YAML"):
        data.concept_specs(TrainConfig(concepts=str(tmp_path)))


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    rgb = np.asarray(data.load_image(tmp_path / "grey16.png"), np.float64)
    assert rgb.shape == (64, 64, 3)
    np.testing.assert_allclose(rgb[..., 0], ramp / 257.0, atol=0.51)  # every level kept, none clipped
    assert (rgb == 255).mean() < 0.01


# ---------------------------------------------------------------------------------------------------------------------
# Prompts that cannot fit the text encoder


def test_too_many_vectors_for_the_prompts_is_refused_naming_the_limit(tmp_path, tiny_dirs):
    from tests.test_train import make_concept
    from train.invert import run

    images = make_concept(tmp_path / "thing", n=2)
    cfg = TrainConfig(model=str(tiny_dirs("sd1")), images=str(images), token="<thing>", init="cat", vectors=100,
                      out=str(tmp_path / "run"), validate_every=0, steps=2)
    with pytest.raises(ConfigError, match=r"at most 77 .*--vectors \d+ or fewer"):
        run(cfg, progress=False)
    assert not (tmp_path / "run" / "learned_embeds.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------------
# tix generate


@pytest.mark.parametrize("flags, words", [
    (["--n", "0"], ["--n 0", "at least 1"]),
    (["--size", "-8"], ["--size -8"]),
    (["--size", "0"], ["--size 0"]),
    (["--steps", "0"], ["--steps 0"]),
])
def test_generate_refuses_bad_numbers_before_loading(flags, words, tmp_path, capsys):
    # A model path that does not exist: the argument check must come first and name the argument.
    err = _exit_2(["generate", "--model", str(tmp_path / "none"), "--prompt", "x", "--out", str(tmp_path / "o"),
                   *flags], capsys)
    for word in words:
        assert word in err


def test_generate_api_refuses_a_size_of_zero(tiny_dirs):
    sd = tix.load(tiny_dirs("sd1"))
    with pytest.raises(ConfigError, match="size 0x0"):
        sd.generate(["a cat"], steps=1, size=0)


def test_generate_out_must_be_a_writable_folder(tmp_path, tiny_dirs, capsys, monkeypatch):
    model = str(tiny_dirs("sd1"))
    (tmp_path / "file.png").write_bytes(b"not a folder")
    for out in (tmp_path / "file.png", tmp_path / "file.png" / "sub"):
        err = _exit_2(["generate", "--model", model, "--prompt", "x", "--out", str(out)], capsys)
        assert "is a file, not a folder" in err

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    sampled = []
    monkeypatch.setattr(tix.StableDiffusion, "generate", lambda *a, **k: sampled.append(1))
    monkeypatch.setattr(Path, "mkdir", denied)  # a read-only parent (tests run as root, where chmod does not bite)
    err = _exit_2(["generate", "--model", model, "--prompt", "x", "--out", str(tmp_path / "new")], capsys)
    assert "cannot write there (Permission denied)" in err
    assert not sampled  # refused before any sampling time is spent


# ---------------------------------------------------------------------------------------------------------------------
# tix concepts, tix export


def test_concepts_on_a_missing_library_is_an_error(tmp_path, capsys):
    for action in (["list"], ["show", "<x>"], ["rm", "<x>"]):
        err = _exit_2(["concepts", action[0], str(tmp_path / "MISSING"), *action[1:]], capsys)
        assert "MISSING" in err and "does not exist" in err
    err = _exit_2(["concepts", "merge", str(tmp_path / "lib"), "--other", str(tmp_path / "NOPE")], capsys)
    assert "NOPE" in err


def test_export_of_an_unknown_token_lists_the_tokens(tmp_path, capsys):
    from tix.embedding_files import Concept

    lib = Library(tmp_path / "lib")
    for i, token in enumerate(("<cat>", "<dog>")):
        lib.add(Concept(token, {"text_encoder": np.full((1, 32), i, np.float32)}), {})
    err = _exit_2(["export", str(tmp_path / "lib"), "--token", "NOPE", "--out", str(tmp_path / "x")], capsys)
    assert "'NOPE'" in err and "<cat>" in err and "<dog>" in err
    assert not (tmp_path / "x").exists()

