"""Every export against the rules of the front-ends that load it: AUTOMATIC1111 (its safe-unpickler gate, then
`EmbeddingDatabase.load_from_file`), ComfyUI (`comfy/sd1_clip.py` `load_embed`), kohya sd-scripts (`load_weights`) and
diffusers (`load_textual_inversion`'s file rules; test_export_diffusers runs the real pipelines).

The rules are written here from the front-ends' documented behaviour (formats reference), not imported: none of these
tools is a test dependency. They check the files' bytes (zip members, pickle globals, keys, shapes, dtypes, metadata),
so a torch release that changes torch.save's layout fails here rather than in users' web UIs.
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import tix
from tix import embedding_files as ef

WIDTHS = {"sd1": (768,), "sd2": (1024,), "sdxl": (768, 1280)}
VECTORS = {"sd1": 1, "sd2": 3, "sdxl": 2}
MADE = ef.Provenance(steps=400, model="stable-diffusion-v1-5", model_hash="0123456789abcdef")
TOKEN, WORD = "<my-heart>", "my-heart"  # the token, and the file name every front-end prompt uses

# ---------------------------------------------------------------------------------------------------------------------
# AUTOMATIC1111's safe-unpickler gate (modules/safe.py), as a rule

# Zip members: '<folder>/data.pkl', '<folder>/version', '<folder>/data/<digits>', nothing else.
A1111_ZIP_MEMBER = re.compile(r"[^/]+/(data/\d+|version|data\.pkl)")
A1111_GLOBALS = {
    ("collections", "OrderedDict"),
    *(("torch._utils", n) for n in ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_device_tensor_from_numpy")),
    *(("torch", n) for n in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage",
                             "ByteStorage", "float32", "BFloat16Storage")),
    ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "dtype"), ("numpy", "ndarray"), ("_codecs", "encode"), ("__builtin__", "set"),
}
LEGACY_PICKLES = 5  # torch's legacy layout: magic, protocol, sys info, the object, the storage keys


class _Inert:
    """What every allowed global becomes: nothing of torch or numpy runs while the gate reads a file."""

    def __init__(self, *args, **kwargs):
        self.args = args


class _GateUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in A1111_GLOBALS:
            raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")
        return collections.OrderedDict if name == "OrderedDict" else _Inert

    def persistent_load(self, saved_id):
        if not (isinstance(saved_id, tuple) and saved_id and saved_id[0] == "storage"):
            raise pickle.UnpicklingError(f"persistent id {saved_id!r} is not a storage")
        return _Inert()


def a1111_gate(path: Path) -> None:
    """Raise unless AUTOMATIC1111 with default settings (no --disable-safe-unpickle) would go on to load `path`."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        with open(path, "rb") as f:
            unpickler = _GateUnpickler(f)
            for _ in range(LEGACY_PICKLES):
                unpickler.load()
        return
    with archive:
        names = archive.namelist()
        bad = [n for n in names if not A1111_ZIP_MEMBER.fullmatch(n)]
        if bad:
            raise pickle.UnpicklingError(f"bad file inside {path.name}: {bad}")
        pickles = [n for n in names if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise pickle.UnpicklingError(f"{len(pickles)} data.pkl in {path.name}")
        _GateUnpickler(io.BytesIO(archive.read(pickles[0]))).load()


def _torch_load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def a1111_load(path: Path) -> dict:
    """AUTOMATIC1111's reading of one embedding file (load_from_file), returning what it registers."""
    ext = path.suffix.upper()
    if ext in (".PT", ".BIN"):
        a1111_gate(path)
        data = _torch_load(path)
    elif ext == ".SAFETENSORS":
        data = load_file(path, device="cpu")
    else:
        raise AssertionError(f"A1111 does not read {path.name} as an embedding")
    if "string_to_param" in data:
        params = data["string_to_param"]
        assert len(params) == 1, "embedding file has multiple terms in it"
        vec = next(iter(params.values())).detach().to(torch.float32)
        shape, vectors = vec.shape[-1], vec.shape[0]
    elif type(data) is dict and "clip_g" in data and "clip_l" in data:
        vec = {k: v.detach().to(torch.float32) for k, v in data.items()}  # every value must be a tensor
        shape, vectors = data["clip_g"].shape[-1] + data["clip_l"].shape[-1], data["clip_g"].shape[0]
    elif type(data) is dict and type(next(iter(data.values()))) is torch.Tensor:
        assert len(data) == 1, "embedding file has multiple terms in it"
        vec = next(iter(data.values()))
        vec = (vec[None] if vec.ndim == 1 else vec).detach().to(torch.float32)
        shape, vectors = vec.shape[-1], vec.shape[0]
    else:
        raise AssertionError(f"A1111 could not identify {path.name}")
    return {"name": path.stem, "vec": vec, "shape": shape, "vectors": vectors, "step": data.get("step"),
            "sd_checkpoint": data.get("sd_checkpoint"), "sd_checkpoint_name": data.get("sd_checkpoint_name")}


# ---------------------------------------------------------------------------------------------------------------------
# ComfyUI (comfy/sd1_clip.py load_embed), kohya (load_weights), diffusers (load_textual_inversion's file rules)

COMFY_KEYS = {"sd1": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g")}


def comfy_find(folder: Path, name: str) -> Path | None:
    """`embedding:NAME` in a prompt: NAME itself, else NAME.safetensors, .pt, .bin under the embeddings folder."""
    base = folder / name
    if base.is_file():
        return base
    return next((p for p in (base.with_name(base.name + e) for e in (".safetensors", ".pt", ".bin")) if p.is_file()),
                None)


def comfy_embed(path: Path, key: str) -> torch.Tensor:
    data = load_file(path, device="cpu") if path.name.lower().endswith(".safetensors") else _torch_load(path)
    if "string_to_param" in data:
        return next(iter(data["string_to_param"].values()))
    return data[key] if key in data else next(iter(data.values()))


def kohya_load(path: Path, sdxl: bool) -> list[torch.Tensor]:
    if path.suffix == ".safetensors":
        data = load_file(path)
    else:
        data = _torch_load(path)
        assert type(data) is dict
        if "string_to_param" in data and not sdxl:
            data = data["string_to_param"]
    if sdxl:
        return [data["clip_l"], data["clip_g"]]
    emb = next(iter(data.values()))
    assert type(emb) is torch.Tensor
    return [emb[None] if emb.ndim == 1 else emb]


def diffusers_state(path: Path) -> dict:
    """load_textual_inversion's read of a file or a folder (learned_embeds.safetensors, then learned_embeds.bin)."""
    if path.is_dir():
        path = next(p for p in (path / "learned_embeds.safetensors", path / "learned_embeds.bin") if p.is_file())
    return load_file(path) if path.suffix == ".safetensors" else _torch_load(path)


# ---------------------------------------------------------------------------------------------------------------------
# The exports


def _concept(kind: str) -> ef.Concept:
    rng = np.random.default_rng(len(kind))
    return ef.Concept(TOKEN, {name: rng.standard_normal((VECTORS[kind], w)).astype(np.float32)
                              for name, w in zip(ef.ENCODERS, WIDTHS[kind], strict=False)}, MADE)


def _exact(tensor: torch.Tensor, expected: np.ndarray) -> None:
    assert tensor.dtype == torch.float32 and tuple(tensor.shape) == expected.shape
    np.testing.assert_array_equal(tensor.numpy(), expected)


@pytest.mark.parametrize("pickled", [False, True], ids=["safetensors", "pickle"])
@pytest.mark.parametrize("kind", list(WIDTHS))
@pytest.mark.parametrize("fmt", ["a1111", "kohya"])
def test_a1111_and_kohya_exports_load_everywhere(tmp_path, fmt, kind, pickled):
    c = _concept(kind)
    (path,) = ef.write(c, tmp_path, fmt, torch_pickle=pickled)
    assert path.name == WORD + (".pt" if pickled else ".safetensors")
    te = c.vectors["text_encoder"]

    got = a1111_load(path)  # the gate passes (pickles) and load_from_file registers the file
    assert got["name"] == WORD and got["vectors"] == VECTORS[kind]
    assert got["shape"] == sum(WIDTHS[kind])  # what A1111 compares with the loaded model's width
    if kind == "sdxl":
        assert set(got["vec"]) == {"clip_l", "clip_g"}
        _exact(got["vec"]["clip_l"], te)
        _exact(got["vec"]["clip_g"], c.vectors["text_encoder_2"])
    else:
        _exact(got["vec"], te)
    # step and model wherever the file has a place for them: A1111's own .pt (other pickles must hold tensors only).
    if fmt == "a1111" and pickled and kind != "sdxl":
        assert (got["step"], got["sd_checkpoint_name"], got["sd_checkpoint"]) == (400, MADE.model, MADE.model_hash)
    else:
        assert got["step"] is None
    if not pickled:
        with safe_open(path, "np") as h:
            meta = h.metadata()
        assert meta["steps"] == "400" and meta["model"] == MADE.model and meta["token"] == TOKEN
        assert meta["vectors"] == str(VECTORS[kind]) and meta["tix_version"] == tix.__version__

    assert comfy_find(tmp_path, WORD) == path  # `embedding:my-heart`
    for key, name in zip(COMFY_KEYS[kind], ef.ENCODERS, strict=False):
        _exact(comfy_embed(path, key), c.vectors[name])

    for tensor, name in zip(kohya_load(path, kind == "sdxl"), ef.ENCODERS, strict=False):
        _exact(tensor, c.vectors[name])


@pytest.mark.parametrize("pickled", [False, True], ids=["safetensors", "pickle"])
@pytest.mark.parametrize("kind", list(WIDTHS))
def test_diffusers_exports(tmp_path, kind, pickled):
    c = _concept(kind)
    files = ef.write(c, tmp_path, "diffusers", torch_pickle=pickled)
    ext = ".bin" if pickled else ".safetensors"
    assert files == [tmp_path / WORD / f"learned_embeds{ext}"] + (
        [tmp_path / WORD / f"learned_embeds_2{ext}"] if kind == "sdxl" else [])
    # diffusers: {token: float32 [n, D]}, one key, found by folder; the SDXL pair is loaded once per encoder.
    for file, name in zip(files, ef.ENCODERS, strict=False):
        state = diffusers_state(file.parent if name == "text_encoder" else file)
        assert list(state) == [TOKEN]
        _exact(state[TOKEN], c.vectors[name])
    for file, name in zip(files, ef.ENCODERS, strict=False):  # pickled or not: A1111's gate, one term, exact
        got = a1111_load(file)
        assert got["step"] is None and got["name"] == file.stem
        _exact(got["vec"], c.vectors[name])
    if kind == "sdxl":
        # Each half alone is one encoder's width: A1111 skips it on an SDXL model (expects 768 + 1280) and ComfyUI's
        # clip_g lookup falls back to the first tensor, 768 wide. The pair is for diffusers; front-ends take the
        # {clip_l, clip_g} file of the a1111/kohya formats.
        assert [a1111_load(f)["shape"] for f in files] == [768, 1280] and sum(WIDTHS[kind]) == 2048
        assert comfy_embed(files[0], "clip_g").shape[-1] == 768
    else:
        path = comfy_find(tmp_path, f"{WORD}/learned_embeds")
        _exact(comfy_embed(path, COMFY_KEYS[kind][0]), c.vectors["text_encoder"])
        _exact(kohya_load(files[0], False)[0], c.vectors["text_encoder"])


def test_the_gate_rule_refuses_what_a1111_refuses(tmp_path):
    """The checker above is not vacuous: it refuses torch.save's extra zip members and code in a pickle."""
    (good,) = ef.write(_concept("sd1"), tmp_path, "a1111", torch_pickle=True)
    a1111_gate(good)
    assert not zipfile.is_zipfile(good)  # torch's legacy layout, which the gate reads as five pickles

    data = pickle.dumps({"x": 1}, protocol=2)
    for extra, refused in (("archive/version", False), ("archive/.format_version", True), ("archive/byteorder", True),
                           ("archive/.data/serialization_id", True)):
        zipped = tmp_path / f"{extra.replace('/', '_')}.pt"
        with zipfile.ZipFile(zipped, "w") as z:
            z.writestr("archive/data.pkl", data)
            z.writestr("archive/data/0", b"\0" * 8)
            z.writestr(extra, b"3")
        if refused:
            with pytest.raises(pickle.UnpicklingError, match="bad file inside"):
                a1111_gate(zipped)
        else:
            a1111_gate(zipped)

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, ("true",))

    torch.save({"x": Payload()}, tmp_path / "evil.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(pickle.UnpicklingError, match="forbidden"):
        a1111_gate(tmp_path / "evil.pt")
