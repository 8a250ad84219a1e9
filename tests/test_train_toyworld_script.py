"""scripts/train_toyworld.py's stage 3 (blended noun phrases) and `--from-pipeline`, which made the shipped model
from the one shipped before: taking a saved model apart and putting it back must not change a weight, and stage 3
must train, checkpoint and resume like the stages before it."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tix.toyworld import model as M
from tix.toyworld import model_dir, world
from tix.weights import read_safetensors

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_toyworld.py"
WEIGHTS = ("text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
           "vae/diffusion_pytorch_model.safetensors", "erased_words.safetensors")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_toyworld", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _run(script, tmp_path: Path, *extra: str) -> Path:
    out = tmp_path / "out"
    script.main(["--from-pipeline", str(model_dir()), "--out", str(out), "--work", str(tmp_path / "work"),
                 "--eval-images", "0", *extra])
    return out


def _max_change(a: Path, b: Path, name: str) -> float:
    x, y = read_safetensors(a / name), read_safetensors(b / name)
    assert sorted(x) == sorted(y)
    return max(float(np.abs(np.asarray(x[k], np.float32) - np.asarray(y[k], np.float32)).max()) for k in x)


def test_a_saved_model_taken_apart_and_saved_again_is_unchanged(script, tmp_path):
    out = _run(script, tmp_path, "--blend-steps", "0")
    for name in WEIGHTS:
        assert _max_change(out, model_dir(), name) == 0.0, name
    assert (out / "tokenizer" / "vocab.json").read_text() == (model_dir() / "tokenizer" / "vocab.json").read_text()


def test_stage_3_trains_resumes_and_refuses_other_settings(script, tmp_path, capsys):
    out = _run(script, tmp_path, "--blend-steps", "2", "--checkpoint-every", "1")
    assert "stage 3 (blended noun phrases): steps 0..2" in capsys.readouterr().out
    assert _max_change(out, model_dir(), WEIGHTS[1]) > 0  # the UNet moved
    assert _max_change(out, model_dir(), WEIGHTS[2]) == 0  # the VAE is frozen
    _run(script, tmp_path, "--blend-steps", "2", "--checkpoint-every", "1")
    assert "stage 3 (blended noun phrases): done before, loaded" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="other settings"):
        _run(script, tmp_path, "--blend-steps", "2", "--blend-lr", "1e-3")


def test_training_captions_drop_and_blend_from_their_own_streams(script):
    _, captions = world.dataset(400, 5, 8, erased=True)
    plain = script.training_captions(captions, 77, 0.1, 0.0)
    assert 20 < plain.count("") < 60
    blended = script.training_captions(captions, 77, 0.1, 0.5)
    # Blending leaves the dropped captions where they were and changes only the noun phrases it fuses.
    assert [c == "" for c in blended] == [c == "" for c in plain]
    assert [c.replace(world.BLEND, " ") for c in blended] == plain
    fused = sum(world.BLEND in c for c in blended)
    multiword = sum(world.BLEND in world.blend_noun(c) for c in plain)
    assert 0.35 * multiword < fused < 0.65 * multiword


def test_a_wider_text_encoder_widens_the_unets_cross_attention(script):
    # `--text '{"hidden_size": N}'` alone must build a model whose UNet reads N-wide states.
    shipped = json.loads((model_dir() / "unet" / "config.json").read_text())
    assert M.unet_config()["cross_attention_dim"] == shipped["cross_attention_dim"]
    args = script.parse_args(["--text", '{"hidden_size": 96, "intermediate_size": 384}'])
    text = M.text_config(10, args.text)
    unet = M.unet_config(args.unet, text["hidden_size"])
    assert unet["cross_attention_dim"] == 96
    assert M.unet_config({"cross_attention_dim": 48}, 96)["cross_attention_dim"] == 48  # an explicit --unet wins
