"""tix.load: formats (fp16 variants, shards, Hub cache, .bin), torch-free loading, storage vs compute dtype, and the
errors bad checkpoints give. Each test copies a tiny pipeline folder before changing it."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import tix
from tix import loading, weights
from tix.errors import CheckpointError, ConfigError

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = loading.WEIGHT_NAMES  # component -> weights file stem


def _copy(tiny_dirs, kind: str, tmp_path: Path) -> Path:
    dst = tmp_path / kind
    shutil.copytree(tiny_dirs(kind), dst)
    return dst


def _leaves(sd) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_leaves_with_path(sd.params)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def _rewrite(folder: Path, fn, name: str, *, keep: bool) -> None:
    """Write `<stem>.<name>.safetensors` = fn(tensors) next to each component's full weights (deleting them unless
    `keep`)."""
    for component, stem in COMPONENTS.items():
        src = folder / component / f"{stem}.safetensors"
        if not src.exists():
            continue
        state = weights.read_safetensors(src)
        out = src.with_name(f"{stem}.{name}.safetensors")
        save_file({k: np.ascontiguousarray(fn(v)) for k, v in state.items()}, str(out))
        if not keep:
            src.unlink()


def _run(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-c", code, *args], env=full_env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def ref(tiny_dirs):
    """The fp32 load of the tiny SD1 folder, as numpy leaves."""
    return _leaves(tix.load(tiny_dirs("sd1")))


# ---- torch is never imported ------------------------------------------------------------------------------------

NO_TORCH = """
import sys
import numpy as np
import tix
for folder in sys.argv[1:]:
    sd = tix.load(folder)
    context, pooled = sd.encode_prompts(["a photo of a cat", "a dog"])
    out = sd.predict_noise(np.zeros((2, 8, 8, 4), np.float32), 500, context, pooled)
    assert out.shape == (2, 8, 8, 4) and np.isfinite(np.asarray(out)).all()
    print(sd.kind, context.shape, None if pooled is None else pooled.shape)
print("TORCH_MODULES", sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""


def test_loading_and_running_never_imports_torch(tiny_dirs):
    assert importlib.util.find_spec("torch") is not None, "torch must be installed for this test to prove anything"
    proc = _run(NO_TORCH, str(tiny_dirs("sd1")), str(tiny_dirs("sdxl")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("sd1") and lines[1].startswith("sdxl"), proc.stdout
    assert lines[-1] == "TORCH_MODULES []", lines[-1]


# ---- fp16 variants -----------------------------------------------------------------------------------------------

def test_fp16_variant_only_loads_in_half_and_full_precision(tiny_dirs, tmp_path, ref):
    folder = _copy(tiny_dirs, "sd1", tmp_path)
    _rewrite(folder, lambda v: v.astype(np.float16), "fp16", keep=False)
    assert not list(folder.rglob("*model.safetensors")), "only the fp16 files remain"
    half = _leaves(tix.load(folder, "float16"))
    full = _leaves(tix.load(folder, "float32"))
    assert half.keys() == full.keys() == ref.keys()
    for key, value in ref.items():
        assert half[key].dtype == np.float16 and full[key].dtype == np.float32, key
        np.testing.assert_array_equal(half[key], value.astype(np.float16), err_msg=key)
        np.testing.assert_array_equal(full[key], value.astype(np.float16).astype(np.float32), err_msg=key)
        # Round to nearest: within half an fp16 ulp of the fp32 weights (plus the subnormal spacing near zero).
        np.testing.assert_allclose(full[key], value, rtol=2.0**-11, atol=2.0**-25, err_msg=key)


def test_variant_chosen_by_dtype_when_both_files_exist(tiny_dirs, tmp_path, ref):
    folder = _copy(tiny_dirs, "sd1", tmp_path)
    # The fp16 file holds the negated weights, so every leaf shows which file was read.
    _rewrite(folder, lambda v: (-v).astype(np.float16), "fp16", keep=True)
    negated = {k: -v.astype(np.float16).astype(np.float32) for k, v in ref.items()}

    full = _leaves(tix.load(folder, "float32"))
    for key in ref:
        np.testing.assert_array_equal(full[key], ref[key], err_msg=key)
    for dtype, np_dtype in (("float16", np.float16), ("bfloat16", jax.numpy.bfloat16)):
        half = _leaves(tix.load(folder, dtype))
        for key in ref:
            assert half[key].dtype == np_dtype, key
            np.testing.assert_array_equal(half[key], negated[key].astype(np_dtype), err_msg=f"{dtype} {key}")
    asked = _leaves(tix.load(folder, "float32", variant="fp16"))
    for key in ref:
        np.testing.assert_array_equal(asked[key], negated[key], err_msg=key)


def test_choose_weights_never_picks_two_precisions():
    base = "diffusion_pytorch_model"
    both = {f"{base}.safetensors", f"{base}.fp16.safetensors", f"{base}.bin", f"{base}.fp16.bin",
            f"{base}.non_ema.safetensors", "config.json"}
    assert loading._choose_weights(both, base, None) == [f"{base}.safetensors"]
    assert loading._choose_weights(both, base, "fp16") == [f"{base}.fp16.safetensors"]
    assert loading._choose_weights({f"{base}.fp16.safetensors"}, base, None) == [f"{base}.fp16.safetensors"]
    assert loading._choose_weights({f"{base}.bin", f"{base}.fp16.bin"}, base, None) == [f"{base}.bin"]
    assert loading._choose_weights({"pytorch_model.bin", "config.json"}, "model", None) == ["pytorch_model.bin"]
    # Sharded, both precisions, with the names diffusers/transformers write.
    shards32 = {f"{base}-0000{i}-of-00002.safetensors" for i in (1, 2)}
    shards16 = {f"{base}.fp16-0000{i}-of-00002.safetensors" for i in (1, 2)}
    sharded = shards32 | shards16 | {f"{base}.safetensors.index.json", f"{base}.safetensors.index.fp16.json"}
    assert loading._choose_weights(sharded, base, None) == [f"{base}.safetensors.index.json", *sorted(shards32)]
    assert loading._choose_weights(sharded, base, "fp16") == [f"{base}.safetensors.index.fp16.json", *sorted(shards16)]
    # The asked variant wins over the full weights even when only the variant is sharded.
    mixed = shards16 | {f"{base}.safetensors.index.fp16.json", f"{base}.safetensors"}
    assert loading._choose_weights(mixed, base, "fp16")[0] == f"{base}.safetensors.index.fp16.json"
    assert loading._choose_weights(mixed, base, None) == [f"{base}.safetensors"]
    assert loading._choose_weights({"config.json"}, base, None) == []


# ---- shards ------------------------------------------------------------------------------------------------------

def test_sharded_safetensors_load(tiny_dirs, tmp_path, ref):
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = _copy(tiny_dirs, "sd1", tmp_path)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    text = CLIPTextModel.from_pretrained(folder / "text_encoder")
    for model, component, stem, shard in ((unet, "unet", "diffusion_pytorch_model", "1MB"),
                                          (text, "text_encoder", "model", "100KB")):
        (folder / component / f"{stem}.safetensors").unlink()
        model.save_pretrained(folder / component, max_shard_size=shard)
        model.to(torch.float16).save_pretrained(folder / component, max_shard_size=shard, variant="fp16")
    names = sorted(p.name for p in (folder / "unet").iterdir())
    assert "diffusion_pytorch_model.safetensors.index.json" in names, names
    assert "diffusion_pytorch_model.safetensors.index.fp16.json" in names, names
    assert sum(n.startswith("diffusion_pytorch_model-") for n in names) > 1, names
    assert sum(n.startswith("model-") for n in os.listdir(folder / "text_encoder")) > 1

    full = _leaves(tix.load(folder))
    assert full.keys() == ref.keys()
    for key in ref:
        np.testing.assert_array_equal(full[key], ref[key], err_msg=key)
    half = _leaves(tix.load(folder, "float16"))
    for key in ref:
        np.testing.assert_array_equal(half[key], ref[key].astype(np.float16), err_msg=key)

    # A shard the index names but the folder lacks.
    next((folder / "unet").glob("diffusion_pytorch_model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="shard diffusion_pytorch_model-00002"):
        tix.load(folder)


# ---- Hub ids -----------------------------------------------------------------------------------------------------

HUB = """
import json
import tix
from tix.errors import CheckpointError
from tix.loading import resolve
sd = tix.load("owner/tiny-sd")
out = {"path": str(resolve("owner/tiny-sd")), "kind": sd.kind, "source": sd.source}
try:
    tix.load("owner/not-cached")
except CheckpointError as err:
    out["missing"] = str(err)
print(json.dumps(out))
"""


def test_hub_id_resolves_offline_through_the_cache(tiny_dirs, tmp_path):
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--owner--tiny-sd"
    shutil.copytree(tiny_dirs("sd1"), repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    proc = _run(HUB, env={"HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["path"]) == repo / "snapshots" / commit
    assert out["kind"] == "sd1" and out["source"] == "owner/tiny-sd"
    assert "owner/not-cached" in out["missing"] and "Hugging Face Hub" in out["missing"]


# The files of stable-diffusion-v1-5/stable-diffusion-v1-5 that matter here (root single-file checkpoints included).
SD15_REPO = [
    "model_index.json", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.ckpt",
    "feature_extractor/preprocessor_config.json", "safety_checker/config.json", "safety_checker/model.safetensors",
    "safety_checker/model.fp16.safetensors", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin", "text_encoder/pytorch_model.fp16.bin",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.non_ema.bin",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.bin",
]


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_hub_download_asks_for_one_weights_file_per_component(monkeypatch, tmp_path, variant):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import filter_repo_objects

    asked = {}

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        asked["patterns"] = allow_patterns
        return str(tmp_path)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, **kw: list(SD15_REPO))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert loading.resolve("stable-diffusion-v1-5/stable-diffusion-v1-5", variant) == tmp_path
    chosen = set(filter_repo_objects(SD15_REPO, allow_patterns=asked["patterns"]))
    weight_files = {f for f in chosen if f.endswith((".safetensors", ".bin", ".ckpt"))}
    suffix = ".fp16.safetensors" if variant else ".safetensors"
    assert weight_files == {"text_encoder/model" + suffix, "unet/diffusion_pytorch_model" + suffix,
                            "vae/diffusion_pytorch_model" + suffix}
    assert {"model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "tokenizer/vocab.json",
            "tokenizer/merges.txt"} <= chosen


# ---- .bin checkpoints --------------------------------------------------------------------------------------------

def _to_bin(folder: Path) -> None:
    import torch

    for component, stem in COMPONENTS.items():
        src = folder / component / f"{stem}.safetensors"
        if src.exists():
            state = {k: torch.from_numpy(np.array(v)) for k, v in weights.read_safetensors(src).items()}
            torch.save(state, src.with_name(f"{loading._bin_base(stem)}.bin"))
            src.unlink()


def test_bin_checkpoint_loads_through_torch(tiny_dirs, tmp_path, ref):
    folder = _copy(tiny_dirs, "sd1", tmp_path)
    _to_bin(folder)
    assert not list(folder.rglob("*.safetensors"))
    got = _leaves(tix.load(folder))
    assert got.keys() == ref.keys()
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)


def test_bin_checkpoint_without_torch_says_how_to_convert(tiny_dirs, tmp_path, monkeypatch):
    folder = _copy(tiny_dirs, "sd1", tmp_path)
    _to_bin(folder)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(CheckpointError) as err:
        tix.load(folder)
    msg = str(err.value)
    assert "torch is not installed" in msg and "safetensors" in msg and "save_pretrained" in msg, msg


class _Payload:
    def __reduce__(self):
        return (print, ("PAYLOAD RAN",))


def test_bin_pickle_with_code_is_refused(tiny_dirs, tmp_path, capsys):
    import pickle

    folder = _copy(tiny_dirs, "sd1", tmp_path)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "vae" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"x": _Payload()}))
    with pytest.raises(CheckpointError, match="refused or unreadable"):
        tix.load(folder)
    assert "PAYLOAD RAN" not in capsys.readouterr().out


# ---- bad checkpoints ---------------------------------------------------------------------------------------------

def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_missing_component_folder(tiny_dirs, tmp_path):
    folder = _copy(tiny_dirs, "sd1", tmp_path)
    shutil.rmtree(folder / "vae")
    with pytest.raises(CheckpointError, match=r"the vae/ folder is missing"):
        tix.load(folder)


def test_missing_weights_file(tiny_dirs, tmp_path):
    folder = _copy(tiny_dirs, "sd1", tmp_path)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"unet: no weights found .*diffusion_pytorch_model\.safetensors"):
        tix.load(folder)


def test_missing_config_and_scheduler(tiny_dirs, tmp_path):
    folder = _copy(tiny_dirs, "sd1", tmp_path)
    (folder / "text_encoder" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"text_encoder: config.json is missing"):
        tix.load(folder)
    folder = _copy(tiny_dirs, "sdxl", tmp_path)
    (folder / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"scheduler/scheduler_config.json is missing"):
        tix.load(folder)


@pytest.mark.parametrize(("component", "field", "value"), [
    ("unet", "block_out_channels", [32, 48]),
    ("unet", "cross_attention_dim", 48),
    ("vae", "latent_channels", 8),
    ("text_encoder", "intermediate_size", 80),
])
def test_weights_that_do_not_match_the_config(tiny_dirs, tmp_path, component, field, value):
    folder = _copy(tiny_dirs, "sd1", tmp_path)
    _edit_json(folder / component / "config.json", **{field: value})
    with pytest.raises(CheckpointError) as err:
        tix.load(folder)
    msg = str(err.value)
    print(f"{component}.{field}={value}: {msg[:300]}")
    assert component in msg and "shape" in msg, msg


def test_components_from_different_models(tiny_dirs, tmp_path):
    folder = _copy(tiny_dirs, "sd1", tmp_path)
    shutil.rmtree(folder / "unet")
    shutil.copytree(tiny_dirs("sdxl") / "unet", folder / "unet")  # expects 64-wide context; CLIP gives 32
    with pytest.raises(CheckpointError, match=r"32-wide context but the UNet's cross_attention_dim is 64"):
        tix.load(folder)


def test_unknown_model_classes(tiny_dirs, tmp_path):
    folder = _copy(tiny_dirs, "sd1", tmp_path)
    _edit_json(folder / "model_index.json", _class_name="StableDiffusion3Pipeline")
    with pytest.raises(CheckpointError, match=r"StableDiffusion3Pipeline.*tix loads Stable Diffusion"):
        tix.load(folder)
    folder = _copy(tiny_dirs, "sdxl", tmp_path)
    _edit_json(folder / "unet" / "config.json", _class_name="UNet2DModel")
    with pytest.raises(CheckpointError, match=r"unet is a UNet2DModel, which tix does not implement"):
        tix.load(folder)
    (folder / "model_index.json").unlink()  # the component's own config still decides
    with pytest.raises(CheckpointError, match=r"UNet2DModel"):
        tix.load(folder)


@pytest.mark.parametrize(("component", "field", "value"), [
    ("unet", "resnet_time_scale_shift", "scale_shift"),
    ("unet", "act_fn", "mish"),
    ("vae", "act_fn", "gelu"),
    ("text_encoder", "hidden_act", "relu"),
])
def test_unsupported_config_value_names_the_field(tiny_dirs, tmp_path, component, field, value):
    folder = _copy(tiny_dirs, "sd1", tmp_path)
    _edit_json(folder / component / "config.json", **{field: value})
    with pytest.raises(ConfigError) as err:
        tix.load(folder)
    msg = str(err.value)
    print(f"{component}.{field}={value!r}: {msg}")
    assert field in msg and str(value) in msg, msg


@pytest.mark.parametrize("path", ["model_index.json", "unet/config.json", "scheduler/scheduler_config.json"])
def test_invalid_json(tiny_dirs, tmp_path, path):
    folder = _copy(tiny_dirs, "sd1", tmp_path)
    (folder / path).write_text('{"_class_name": "UNet2DConditionModel", ')
    with pytest.raises(CheckpointError, match=rf"{path.split('/')[-1]} is not valid JSON"):
        tix.load(folder)


def test_bad_dtype_and_paths(tiny_dirs, tmp_path):
    with pytest.raises(ConfigError, match=r"dtype 'float8' is not supported; use one of float32, bfloat16, float16"):
        tix.load(tiny_dirs("sd1"), "float8")
    with pytest.raises(ConfigError, match=r"dtype 'int8'"):
        tix.load(tiny_dirs("sd1"), compute_dtype="int8")
    with pytest.raises(CheckpointError, match=r"no such folder, and it is not a Hub id"):
        tix.load(tmp_path / "nowhere" / "at" / "all")
    (tmp_path / "file.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is a file; tix.load wants a diffusers folder"):
        tix.load(tmp_path / "file.safetensors")


# ---- storage dtype vs compute dtype ------------------------------------------------------------------------------

def test_bf16_weights_with_f32_compute(tiny_dirs):
    folder = tiny_dirs("sd1")
    sd32 = tix.load(folder)
    sd16 = tix.load(folder, dtype="bfloat16", compute_dtype="float32")
    for key, leaf in _leaves(sd16).items():
        assert leaf.dtype == jax.numpy.bfloat16, key

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    prompts = ["a photo of a cat", "a red dog on a green background"]
    ctx16, _ = sd16.encode_prompts(prompts)
    eps16 = sd16.predict_noise(latents, np.array([10, 700]), ctx16)
    assert ctx16.dtype == eps16.dtype == np.float32

    # f32 compute on bf16 weights is f32 compute on the rounded weights: nearly exact, unlike bf16 compute.
    # One compiled function per model part serves both f32 weight sets.
    text_fn, unet_fn = jax.jit(sd32.text_fn), jax.jit(sd32.unet_fn)
    ids = tuple(map(jax.numpy.asarray, sd32.tokenize(prompts)))
    t = np.array([10, 700])
    rounded = jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16).astype(np.float32), sd32.params)
    ctx_r, _ = text_fn(rounded, ids, sd32.extras())
    eps_r = unet_fn(rounded, latents, t, ctx16)
    exact = max(float(np.abs(ctx16 - ctx_r).max()), float(np.abs(eps16 - eps_r).max()))

    ctx32, _ = text_fn(sd32.params, ids, sd32.extras())
    eps32 = unet_fn(sd32.params, latents, t, ctx32)
    ctx_err = float(np.abs(ctx16 - ctx32).max() / np.abs(ctx32).max())
    eps_err = float(np.abs(eps16 - eps32).max() / np.abs(eps32).max())
    print(f"bf16 weights, f32 compute: vs rounded-f32 {exact:.2e}; vs f32 relative context {ctx_err:.2e}, "
          f"noise {eps_err:.2e}")
    assert exact < 1e-5
    assert ctx_err < 3e-2 and eps_err < 3e-2  # bf16 keeps 8 bits of mantissa: ~0.4% per weight
