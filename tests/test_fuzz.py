"""Fuzzing the readers of untrusted files: every embedding format `tix.embedding_files.read` accepts (safetensors,
torch zip and legacy pickles, .npy, A1111 PNGs, diffusers folders) and the training image loader.

Each case is a valid file damaged one way (cut short, bytes flipped, a span overwritten, garbage after the magic
bytes) or a well-formed file with the wrong content (dtypes, shapes, huge declared sizes). The contract: a reader
either returns well-formed data or raises a tix error (`TixError`; exit 2 through the CLI); never another exception,
never a hang. Seeded, so a failure names a case that reproduces.
"""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import struct
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

import tix
from tix import cli
from tix import embedding_files as ef
from tix.errors import TixError
from train import data

SEED = 20261203
MUTANTS = 24  # damaged copies of each valid file
HANG_S = 20  # one case taking this long is a hang (a slow machine, not a slow reader, makes it more than ~0.1 s)


@contextlib.contextmanager
def _deadline(seconds: int):
    def stop(*_):
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _mutants(raw: bytes, rng: np.random.Generator, count: int) -> list[tuple[str, bytes]]:
    """`count` damaged copies of `raw`, cycling through the kinds of damage."""
    out = []
    for i in range(count):
        kind = ("cut", "flip", "span", "garbage", "tail")[i % 5]
        b = bytearray(raw)
        if kind == "cut":
            b = b[: int(rng.integers(0, len(raw)))]
        elif kind == "flip":
            for pos in rng.integers(0, len(raw), int(rng.integers(1, 9))):
                b[pos] ^= int(rng.integers(1, 256))
        elif kind == "span":
            start = int(rng.integers(0, len(raw)))
            length = int(rng.integers(1, 64))
            b[start:start + length] = rng.bytes(length)
        elif kind == "garbage":  # keeps the magic bytes, so the format's own reader sees it
            b = b[:16] + bytearray(rng.bytes(int(rng.integers(0, 4096))))
        else:
            b = b + bytearray(rng.bytes(int(rng.integers(1, 256))))
        out.append((f"{kind}{i}", bytes(b)))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Embedding files


def _safetensors(tensors: dict[str, tuple[str, list[int], bytes]], header_len: int | None = None,
                 extra: dict | None = None) -> bytes:
    """A safetensors file from (dtype, shape, bytes) per name, laid out in order; `extra` overrides header fields."""
    header, blobs, offset = {}, b"", 0
    for name, (dtype, shape, blob) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        blobs += blob
        offset += len(blob)
    header.update(extra or {})
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if header_len is None else header_len) + text + blobs


def _torch_bytes(obj, legacy: bool = False) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def _npy_bytes(obj, allow_pickle: bool = False) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, obj, allow_pickle=allow_pickle)
    return buffer.getvalue()


def _a1111_png(payload: bytes) -> bytes:
    import io

    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", payload.decode("latin1"))
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _a1111(vec: np.ndarray) -> dict:
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.from_numpy(vec)}, "name": "fuzz", "step": 1}


def _valid_files() -> dict[str, bytes]:
    """One valid file of every format the reader detects (suffix: the name it is saved under)."""
    vec = np.random.default_rng(SEED).standard_normal((2, 32)).astype(np.float32)
    png_json = {"string_to_param": {"*": {"TORCHTENSOR": vec.tolist()}}, "name": "png"}
    return {
        "diffusers.safetensors": _safetensors({"<t>": ("F32", [2, 32], vec.tobytes())}),
        "sdxl.safetensors": _safetensors({"clip_l": ("F16", [2, 32], vec.astype(np.float16).tobytes()),
                                          "clip_g": ("F32", [2, 48], np.zeros((2, 48), np.float32).tobytes())}),
        "zip.bin": _torch_bytes({"<t>": torch.from_numpy(vec)}),
        "a1111.pt": _torch_bytes(_a1111(vec)),
        "legacy.pt": _torch_bytes(_a1111(vec), legacy=True),
        "flax.npy": _npy_bytes({"<t>": vec[0]}, allow_pickle=True),
        "plain.npy": _npy_bytes(vec),
        "a1111.png": _a1111_png(base64.b64encode(json.dumps(png_json).encode())),
    }


def _wrong_content() -> dict[str, bytes]:
    """Well-formed containers holding what no embedding is: wrong dtypes and shapes, huge declared sizes."""
    f32 = np.ones((2, 32), np.float32).tobytes()
    st = {
        "header-2e40.safetensors": _safetensors({"<t>": ("F32", [2, 32], f32)}, header_len=2**40),
        "header-past-end.safetensors": _safetensors({"<t>": ("F32", [2, 32], f32)}, header_len=10_000),
        "offsets-2e40.safetensors": _safetensors({}, extra={"<t>": {"dtype": "F32", "shape": [2**38],
                                                                    "data_offsets": [0, 2**40]}}),
        "shape-huge.safetensors": _safetensors({"<t>": ("F32", [2**20, 2**20], f32)}),
        "shape-negative.safetensors": _safetensors({"<t>": ("F32", [-2, -32], f32)}),
        "offsets-reversed.safetensors": _safetensors({}, extra={"<t>": {"dtype": "F32", "shape": [2],
                                                                        "data_offsets": [8, 0]}}) + f32,
        "dtype-bool.safetensors": _safetensors({"<t>": ("BOOL", [2, 32], bytes(64))}),
        "dtype-unknown.safetensors": _safetensors({"<t>": ("X9", [2, 32], f32)}),
        "dtype-i64.safetensors": _safetensors({"<t>": ("I64", [2, 16], f32)}),
        "no-dtype.safetensors": _safetensors({}, extra={"<t>": {"shape": [2], "data_offsets": [0, 8]}}) + f32[:8],
        "header-list.safetensors": struct.pack("<Q", 2) + b"[]" + f32,
        "header-nested.safetensors": (lambda t: struct.pack("<Q", len(t)) + t)(b"[" * 5000 + b"]" * 5000),
        "nan.safetensors": _safetensors({"<t>": ("F32", [2], np.array([np.nan, 1], np.float32).tobytes())}),
        "3d.safetensors": _safetensors({"<t>": ("F32", [2, 4, 4], f32)}),
        "empty.safetensors": _safetensors({"<t>": ("F32", [0, 32], b"")}),
    }
    pt = {
        "int.pt": _torch_bytes({"<t>": torch.arange(64).reshape(2, 32)}),
        "complex.pt": _torch_bytes({"<t>": torch.zeros(2, 32, dtype=torch.complex64)}),
        "bool.pt": _torch_bytes({"<t>": torch.zeros(2, 32, dtype=torch.bool)}),
        "3d.pt": _torch_bytes({"<t>": torch.zeros(2, 4, 4)}),
        "empty.pt": _torch_bytes({"<t>": torch.zeros(0, 32)}),
        "int-key.pt": _torch_bytes({1: torch.zeros(2, 32)}),
        "string.pt": _torch_bytes({"<t>": "not a tensor"}),
        "list.pt": _torch_bytes([torch.zeros(2, 32)]),
        "param-list.pt": _torch_bytes({"string_to_param": {"*": [[1.0, 2.0], [3.0]]}}),
        "param-none.pt": _torch_bytes({"string_to_param": {"*": None}}),
        "clip-l-only.pt": _torch_bytes({"clip_l": torch.zeros(1, 32), "clip_g": "x"}),
        "nan.pt": _torch_bytes({"<t>": torch.full((1, 32), float("nan"))}),
        "inf-legacy.pt": _torch_bytes({"<t>": torch.full((1, 32), float("inf"))}, legacy=True),
    }
    npy = {
        "header-2e40.npy": _npy_bytes(np.zeros(4, np.float32)).replace(b"(4,)", b"(1099511627776,)"),
        "complex.npy": _npy_bytes(np.zeros((2, 32), np.complex64)),
        "str.npy": _npy_bytes(np.array(["a", "b"])),
        "3d.npy": _npy_bytes(np.zeros((2, 4, 4), np.float32)),
        "object-ragged.npy": _npy_bytes({"<t>": [[1.0], [2.0, 3.0]]}, allow_pickle=True),
        "object-nested.npy": _npy_bytes({"<t>": {"deeper": {"still": np.zeros(3)}}}, allow_pickle=True),
        "object-str.npy": _npy_bytes({"<t>": "text"}, allow_pickle=True),
    }
    png = {
        "bad-base64.png": _a1111_png(b"%%%% not base64"),
        "not-json.png": _a1111_png(base64.b64encode(b"\x00\x01 not json")),
        "json-list.png": _a1111_png(base64.b64encode(b"[1, 2, 3]")),
        "ragged.png": _a1111_png(base64.b64encode(json.dumps(
            {"string_to_param": {"*": {"TORCHTENSOR": [[1.0], [2.0, 3.0]]}}}).encode())),
        "strings.png": _a1111_png(base64.b64encode(json.dumps(
            {"string_to_param": {"*": {"TORCHTENSOR": [["a", "b"]]}}}).encode())),
    }
    return {**st, **pt, **npy, **png}


def _check_read(source: Path, token: str | None = None) -> str:
    """'read' or 'refused'; anything else raises."""
    with _deadline(HANG_S):
        try:
            concepts = ef.read(source, token=token)
        except TixError:
            return "refused"
    for concept in concepts:
        for vectors in concept.vectors.values():
            assert vectors.dtype == np.float32 and vectors.ndim == 2 and np.isfinite(vectors).all()
    return "read"


def _run_cases(cases: list[tuple[str, Callable[[], str]]]) -> dict[str, int]:
    outcomes: dict[str, int] = {}
    failures = []
    for name, case in cases:
        try:
            outcome = case()
        except Exception as err:  # the test's point: collect every escape, then report them all
            failures.append(f"{name}: {type(err).__name__}: {str(err)[:200]}")
            continue
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert not failures, "\n".join(failures)
    return outcomes


def test_embedding_readers_answer_damaged_files_with_tix_errors(tmp_path):
    rng = np.random.default_rng(SEED)
    valid = _valid_files()
    for name, raw in valid.items():  # the seeds themselves are readable, so the damage is what is tested
        (tmp_path / name).write_bytes(raw)
        assert _check_read(tmp_path / name, token="<x>" if name == "plain.npy" else None) == "read", name
    cases = []
    files = dict(_wrong_content())
    for name, raw in valid.items():
        for label, damaged in _mutants(raw, rng, MUTANTS):
            files[f"{label}-{name}"] = damaged
    for name, raw in files.items():
        path = tmp_path / "cases" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(raw)
        cases.append((name, lambda p=path: _check_read(p)))
        if name.endswith(".npy"):  # a bare array reads only with a token: the tensor path too
            cases.append((name + "+token", lambda p=path: _check_read(p, token="<x>")))
    # Diffusers folders: an SDXL pair whose first or second half is damaged, read as a folder.
    sdxl = {"learned_embeds.safetensors": _safetensors({"<t>": ("F32", [1, 32], bytes(128))}),
            "learned_embeds_2.safetensors": _safetensors({"<t>": ("F32", [1, 48], bytes(192))})}
    for i, (label, damaged) in enumerate(_mutants(sdxl["learned_embeds.safetensors"], rng, MUTANTS)):
        folder = tmp_path / "folders" / f"{label}-{i % 2}"
        folder.mkdir(parents=True)
        for name, raw in sdxl.items():
            (folder / name).write_bytes(damaged if name.endswith(f"embeds{'_2' if i % 2 else ''}.safetensors")
                                        else raw)
        cases.append((f"folder {folder.name}", lambda f=folder: _check_read(f)))
    start = time.perf_counter()
    outcomes = _run_cases(cases)
    print(f"{len(cases)} embedding cases in {time.perf_counter() - start:.1f} s: {outcomes}")
    assert outcomes.get("refused", 0) > len(cases) // 2  # most damage is noticed, not read as some other data


def test_damaged_embeddings_exit_2_through_the_cli(tmp_path, tiny_dirs, capsys, monkeypatch):
    monkeypatch.setattr(tix.StableDiffusion, "generate", lambda *a, **k: pytest.fail("sampled with a bad embedding"))
    sd = tix.load(tiny_dirs("sd1"))
    monkeypatch.setattr(tix, "load", lambda *a, **k: sd)  # one model for every call; a refused file adds nothing
    rng = np.random.default_rng(SEED + 1)
    valid = _valid_files()
    for name in ("diffusers.safetensors", "zip.bin", "legacy.pt", "flax.npy", "a1111.png"):
        path = tmp_path / name
        path.write_bytes(_mutants(valid[name], rng, 1)[0][1])  # cut short
        with pytest.raises(SystemExit) as stop:
            cli.main(["generate", "--model", str(tiny_dirs("sd1")), "--prompt", "x", "--embeddings", str(path),
                      "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        # The last line: transformers may log a line of its own while the model loads.
        last = err.strip().splitlines()[-1]
        assert stop.value.code == 2 and last.startswith("tix: error:") and "Traceback" not in err, (name, err)
    assert not sd.text[0].added


# ---------------------------------------------------------------------------------------------------------------------
# Training images


def _image_bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _huge_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels (valid CRC) over a few bytes of data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def _valid_images() -> dict[str, bytes]:
    rng = np.random.default_rng(SEED)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: exif_transpose has work to do
    palette = rgb.convert("P")
    palette.info["transparency"] = 0
    return {
        "rgb.png": _image_bytes(rgb, "PNG"),
        "grey16.png": _image_bytes(Image.fromarray(rng.integers(0, 65536, (24, 32), dtype=np.uint16)), "PNG"),
        "palette.png": _image_bytes(palette, "PNG"),
        "rotated.jpg": _image_bytes(rgb, "JPEG", exif=exif.tobytes()),
        "rgba.webp": _image_bytes(rgb.convert("RGBA"), "WEBP"),
        "rgb.bmp": _image_bytes(rgb, "BMP"),
    }


def _check_image(path: Path) -> str:
    with _deadline(HANG_S), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = data.load_image(path)
    if image is None:
        assert any("skipping unreadable image" in str(w.message) for w in caught)
        return "skipped"
    assert image.mode == "RGB" and min(image.size) > 0
    views = data.crops(image, 8, center=True, count=1, rng=np.random.default_rng(0))
    assert views[0].shape == (8, 8, 3) and np.isfinite(views[0]).all()
    return "loaded"


def test_image_loader_skips_damaged_images_with_a_warning(tmp_path):
    rng = np.random.default_rng(SEED)
    files = {"huge-100000.png": _huge_png(100_000, 100_000), "huge-1x2e31.png": _huge_png(1, 2**31 - 1),
             "zero.png": _huge_png(0, 0)}
    for name, raw in _valid_images().items():
        (tmp_path / name).write_bytes(raw)
        assert _check_image(tmp_path / name) == "loaded", name
        for label, damaged in _mutants(raw, rng, MUTANTS // 2):
            files[f"{label}-{name}"] = damaged
    folder = tmp_path / "cases"
    folder.mkdir()
    cases = []
    for name, raw in files.items():
        (folder / name).write_bytes(raw)
        cases.append((name, lambda p=folder / name: _check_image(p)))
    start = time.perf_counter()
    outcomes = _run_cases(cases)
    print(f"{len(cases)} image cases in {time.perf_counter() - start:.1f} s: {outcomes}")
    assert outcomes.get("skipped", 0) >= 3


def test_a_folder_of_only_damaged_images_is_a_tix_error(tmp_path):
    from train.config import TrainConfig

    rng = np.random.default_rng(SEED)
    folder = tmp_path / "thing"
    folder.mkdir()
    for i, (name, raw) in enumerate(_valid_images().items()):
        (folder / f"{i}-{name}").write_bytes(raw[: int(rng.integers(0, 40))])  # cut inside the header
    cfg = TrainConfig(images=str(folder), token="<thing>")
    concept = data.resolve_concept(data.concept_specs(cfg)[0], cfg)
    with warnings.catch_warnings(record=True), pytest.raises(TixError, match="no usable image"):
        warnings.simplefilter("always")
        data.load_concept_pixels(concept, cfg, 8)
