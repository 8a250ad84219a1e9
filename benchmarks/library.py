"""Export/import and concept-library figures for many concepts.

    python benchmarks/library.py [--n 1000] [--width 768] [--vectors 1] [--tokens-into-model]

For every export format: write N concepts (one file, or one diffusers folder, each) with `tix.embedding_files.write`,
then read the folder back with `tix.embedding_files.read` and check every vector. For the library: `Library.add` N
concepts one by one, its size on disk (`du`), `entries()` (what `tix concepts list` does), one `get`, one `remove`.
With --tokens-into-model, also how long `sd.load_embeddings` takes to add N tokens to a tiny SD 1 model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tix import embedding_files as ef  # noqa: E402
from tix.library import Library  # noqa: E402

FORMATS = [  # (label, format, torch_pickle)
    ("diffusers .safetensors", "diffusers", False),
    ("diffusers .bin", "diffusers", True),
    ("a1111 .pt", "a1111", True),
    ("a1111 .safetensors", "a1111", False),
    ("kohya .safetensors", "kohya", False),
    ("kohya .pt", "kohya", True),
]


def make_concepts(n: int, width: int, vectors: int) -> list[ef.Concept]:
    rng = np.random.default_rng(0)
    return [ef.Concept(f"<concept-{i:04d}>", {"text_encoder": rng.standard_normal((vectors, width)).astype(np.float32)})
            for i in range(n)]


def du(path: Path) -> tuple[int, int]:
    """(bytes allocated on disk, apparent bytes) of a folder."""
    disk = int(subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])
    apparent = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return disk * 1024, apparent


def bench_formats(concepts: list[ef.Concept], work: Path) -> list[dict]:
    want = {c.token: c.vectors["text_encoder"] for c in concepts}
    with contextlib.suppress(ImportError):
        import torch  # noqa: F401  (imported once here so its start-up is not charged to the first pickle format)
    rows = []
    for label, fmt, pickled in FORMATS:
        out = work / f"export-{fmt}-{int(pickled)}"
        start = time.perf_counter()
        files = ef.write(concepts, out, fmt, torch_pickle=pickled)
        t_write = time.perf_counter() - start
        start = time.perf_counter()
        back = ef.read(out)
        t_read = time.perf_counter() - start
        # kohya .pt files carry no token: they come back named after their file, as A1111/ComfyUI name them.
        by_stem = fmt == "kohya" and pickled
        stems = dict(zip(ef.output_stems(want), want, strict=True))
        got = {stems[c.token] if by_stem else c.token: c.vectors["text_encoder"] for c in back}
        assert sorted(got) == sorted(want), f"{label}: tokens differ"
        assert all(np.array_equal(got[t], want[t]) for t in want), f"{label}: vectors differ"
        disk, apparent = du(out)
        rows.append({"format": label, "files": len(files), "export_s": t_write, "import_s": t_read,
                     "disk_bytes": disk, "apparent_bytes": apparent})
        shutil.rmtree(out)
    return rows


def bench_library(concepts: list[ef.Concept], work: Path) -> dict:
    lib = Library(work / "library")
    meta = {"family": "sd1", "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "table_hash": {"text_encoder": "0123456789abcdef"}, "init": "cat", "style": False, "steps": 3000,
            "lr": 5e-4, "images_hash": "fedcba9876543210"}
    start = time.perf_counter()
    for c in concepts:
        lib.add(c, meta)
    t_add = time.perf_counter() - start
    disk, apparent = du(lib.root)
    start = time.perf_counter()
    entries = lib.entries()
    t_list = time.perf_counter() - start
    assert len(entries) == len(concepts)
    want = {c.token: c.vectors["text_encoder"] for c in concepts}
    assert all(np.array_equal(e.concept.vectors["text_encoder"], want[e.concept.token]) for e in entries)
    start = time.perf_counter()
    lib.get(concepts[len(concepts) // 2].token)
    t_get = time.perf_counter() - start
    start = time.perf_counter()
    lib.remove(concepts[0].token)
    t_remove = time.perf_counter() - start
    files = sum(1 for p in lib.root.rglob("*") if p.is_file())
    return {"concepts": len(concepts), "add_s": t_add, "add_ms_each": 1000 * t_add / len(concepts),
            "list_s": t_list, "get_s": t_get, "remove_s": t_remove, "disk_bytes": disk, "apparent_bytes": apparent,
            "files": files}


def bench_tokens_into_model(n: int, work: Path) -> dict:
    """sd.load_embeddings of an N-file export folder into a tiny SD 1 model (32 wide)."""
    import tix
    from tests import tiny

    folder = tiny.build("sd1", work / "tiny-sd1")
    out = work / "export-tiny"
    ef.write(make_concepts(n, 32, 1), out, "kohya")
    sd = tix.load(folder)
    start = time.perf_counter()
    names = sd.load_embeddings(out)
    t_load = time.perf_counter() - start
    prompt = [" ".join(names[:5])]
    start = time.perf_counter()
    sd.encode_prompts(prompt)
    t_encode = time.perf_counter() - start
    return {"tokens": len(names), "load_embeddings_s": t_load, "first_encode_s": t_encode}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--vectors", type=int, default=1)
    p.add_argument("--work", help="folder to work in (default: a temporary folder, removed afterwards)")
    p.add_argument("--skip-formats", action="store_true")
    p.add_argument("--skip-library", action="store_true")
    p.add_argument("--tokens-into-model", action="store_true")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tix-bench-library-"))
    work.mkdir(parents=True, exist_ok=True)
    concepts = make_concepts(args.n, args.width, args.vectors)
    print(f"{args.n} concepts, {args.vectors} x {args.width} float32 each, in {work}", flush=True)
    report: dict = {"n": args.n, "width": args.width, "vectors": args.vectors}
    try:
        if not args.skip_formats:
            report["formats"] = bench_formats(concepts, work)
            print(f"{'format':<24}{'export s':>10}{'import s':>10}{'du MiB':>9}{'bytes':>11}")
            for r in report["formats"]:
                print(f"{r['format']:<24}{r['export_s']:>10.2f}{r['import_s']:>10.2f}"
                      f"{r['disk_bytes'] / 2**20:>9.1f}{r['apparent_bytes']:>11}", flush=True)
        if not args.skip_library:
            lib = report["library"] = bench_library(concepts, work)
            print(f"library: add {lib['add_s']:.1f} s ({lib['add_ms_each']:.1f} ms each), list {lib['list_s']:.1f} s, "
                  f"get {lib['get_s'] * 1000:.0f} ms, remove {lib['remove_s'] * 1000:.0f} ms; "
                  f"{lib['disk_bytes'] / 2**20:.1f} MiB on disk (du), {lib['apparent_bytes'] / 2**20:.1f} MiB of "
                  f"file data in {lib['files']} files", flush=True)
        if args.tokens_into_model:
            tok = report["tokens_into_model"] = bench_tokens_into_model(args.n, work)
            print(f"load_embeddings of {tok['tokens']} tokens into a tiny SD 1: {tok['load_embeddings_s']:.1f} s, "
                  f"first encode {tok['first_encode_s']:.1f} s", flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
