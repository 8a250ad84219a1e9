"""Load and generation figures for tix on this machine (prints them; not a test).

    python benchmarks/load_and_generate.py [--cache /tmp/tix-bench-sd15] [--size 512] [--steps 3 6] [--skip-sd15]

1. Builds once (cached) an SD 1.5-shaped checkpoint with random weights: the real UNet, VAE and CLIP ViT-L/14 text
   configs (vocab 49408), saved by diffusers/transformers `save_pretrained` in fp32 (about 4 GB), with a small
   CLIP-format tokenizer (its ids stay below 49408, so the text encoder's full table is still exercised by loading).
2. In a fresh process: `tix.load` wall time and the process's peak resident memory (getrusage), before and after.
3. In another fresh process: `sd.generate` at `--size` px, batch 1, guidance 7.5 (so the UNet runs on 2 rows), for
   two step counts. Compile time is what JAX's own monitoring events report for tracing, lowering and compiling
   (each step count is its own executable). Seconds per denoising step two ways: the difference of the two runs'
   compile-free times over the step difference, and one UNet call on the doubled batch timed alone (best of 3, the
   figure least disturbed by other work on a shared CPU). Also the VAE decode alone.
4. The same for the tiny SD1-like test model (tests/tiny.py) at its native size.

Each measurement runs in its own subprocess so peak memory and compile caches start from nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SD15_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280), center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SD15_VAE = dict(
    act_fn="silu", block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True)
WORDS = ["a", "photo", "of", "an", "astronaut", "riding", "horse", "on", "mars", "cat", "dog", "painting"]


def build_sd15(folder: Path) -> None:
    """Write the random SD 1.5-shaped pipeline to `folder` (runs in its own process: it imports torch)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tix.tokenizer import load_tokenizer, write_clip_tokenizer

    torch.manual_seed(0)
    tok_dir = Path(tempfile.mkdtemp(prefix="tix-bench-tok-"))
    write_clip_tokenizer(tok_dir, WORDS)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE).eval(), text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval(),
        tokenizer=load_tokenizer(tok_dir), unet=UNet2DConditionModel(**SD15_UNET).eval(),
        scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)  # safetensors, fp32
    tmp.rename(folder)  # only a complete checkpoint ever sits at `folder`
    shutil.rmtree(tok_dir, ignore_errors=True)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure_load(folder: Path) -> dict:
    import jax

    start = time.perf_counter()
    import tix

    _ = tix.load  # the lazy attribute: imports jax/flax/tix.loading
    imported = time.perf_counter()
    rss_import = _rss_mib()
    sd = tix.load(folder)
    jax.block_until_ready(sd.params)
    loaded = time.perf_counter()
    n_params = sum(x.size for x in jax.tree.leaves(sd.params))
    return {"import_s": imported - start, "load_s": loaded - imported, "peak_rss_after_import_mib": rss_import,
            "peak_rss_after_load_mib": _rss_mib(), "params": int(n_params),
            "param_mib": sum(x.nbytes for x in jax.tree.leaves(sd.params)) / 2**20}


class _CompileClock:
    """Seconds JAX spends tracing, lowering and compiling (its own monitoring events), so compile time is measured
    directly rather than as the difference of two calls, which a shared CPU makes noisy."""

    def __init__(self) -> None:
        import jax

        self.total = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, name: str, secs: float, **_: object) -> None:
        if name.startswith("/jax/core/compile/"):
            self.total += secs


def _timed(fn, clock: _CompileClock) -> tuple[float, float]:
    """(wall seconds, of which compile seconds) for one call, results awaited."""
    import jax

    before, start = clock.total, time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start, clock.total - before


def measure_generate(folder: Path, size: int | None, steps: tuple[int, int], repeats: int = 3) -> dict:
    import jax.numpy as jnp
    import numpy as np

    import tix

    clock = _CompileClock()
    sd = tix.load(folder)
    size = size or sd.default_size
    prompt = "a photo of an astronaut riding a horse on mars"

    def log(what: str, wall: float, compile_s: float) -> None:
        print(f"  [{folder.name}] {size}px {what}: {wall:.2f}s (compile {compile_s:.2f}s)", file=sys.stderr, flush=True)

    gen = {}
    for n in steps:
        wall, comp = _timed(lambda n=n: sd.generate([prompt], steps=n, guidance=7.5, sampler="dpm++2m", seed=0,
                                                    size=size), clock)
        gen[n] = {"wall_s": wall, "compile_s": comp, "run_s": wall - comp}
        log(f"generate steps={n}", wall, comp)
    a, b = steps
    per_step_generate = (gen[b]["run_s"] - gen[a]["run_s"]) / (b - a)

    # One denoising step is one UNet call on the guidance-doubled batch; timed alone (best of `repeats`) it is
    # the per-step figure least disturbed by other work on the machine.
    context, _ = sd.encode_prompts(["", prompt])
    latents = jnp.zeros((2, size // sd.vae_scale_factor, size // sd.vae_scale_factor, 4), jnp.float32)
    t = np.array([500, 500])
    unet = [_timed(lambda: sd.predict_noise(latents, t, context), clock) for _ in range(repeats + 1)]
    for i, (wall, comp) in enumerate(unet):
        log(f"UNet call {i}", wall, comp)
    decode = [_timed(lambda: sd.decode_latents(latents[:1]), clock) for _ in range(repeats + 1)]
    for i, (wall, comp) in enumerate(decode):
        log(f"VAE decode call {i}", wall, comp)
    return {
        "size": size, "steps": list(steps), "generate": gen,
        "compile_s": {n: gen[n]["compile_s"] for n in steps},
        "per_step_generate_s": per_step_generate,
        "per_step_unet_s": min(w for w, _ in unet[1:]),
        "unet_compile_s": unet[0][1],
        "decode_s": min(w for w, _ in decode[1:]),
        "decode_compile_s": decode[0][1],
        "peak_rss_mib": _rss_mib(),
    }


def _child(*args: str) -> dict:
    """Run this script in a fresh interpreter for one measurement and return its JSON."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run([sys.executable, __file__, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="/tmp/tix-bench-sd15", help="where the random SD 1.5-shaped checkpoint lives")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, nargs=2, default=(3, 6))
    p.add_argument("--tiny-steps", type=int, nargs=2, default=(3, 23))
    p.add_argument("--skip-sd15", action="store_true")
    p.add_argument("--_build", help=argparse.SUPPRESS)
    p.add_argument("--_load", help=argparse.SUPPRESS)
    p.add_argument("--_generate", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._build:
        build_sd15(Path(args._build))
        print(json.dumps({"built": args._build}))
        return
    if args._load:
        print(json.dumps(measure_load(Path(args._load))))
        return
    if args._generate:
        print(json.dumps(measure_generate(Path(args._generate), args.size or None, tuple(args.steps))))
        return

    results = {}
    with tempfile.TemporaryDirectory(prefix="tix-bench-tiny-") as tmp:
        sys.path.insert(0, str(ROOT))
        from tests import tiny

        tiny_dir = tiny.build("sd1", Path(tmp) / "sd1")
        results["tiny_load"] = _child("--_load", str(tiny_dir))
        results["tiny_generate"] = _child("--_generate", str(tiny_dir), "--size", "0",
                                          "--steps", *map(str, args.tiny_steps))
    if not args.skip_sd15:
        cache = Path(args.cache)
        if not (cache / "model_index.json").exists():
            start = time.perf_counter()
            _child("--_build", str(cache))
            print(f"built {cache} in {time.perf_counter() - start:.0f}s", flush=True)
        size_gb = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 1e9
        results["sd15_checkpoint_gb"] = size_gb
        results["sd15_load"] = _child("--_load", str(cache))
        results["sd15_generate"] = _child("--_generate", str(cache), "--size", str(args.size),
                                          "--steps", *map(str, args.steps))

    print(json.dumps(results, indent=1))
    print("\nfigures (this machine, CPU):")
    for name in ("tiny", "sd15"):
        if f"{name}_load" not in results:
            continue
        lo, ge = results[f"{name}_load"], results[f"{name}_generate"]
        print(f"  {name}: tix.load {lo['load_s']:.2f}s ({lo['params'] / 1e6:.1f}M params, {lo['param_mib']:.0f} MiB), "
              f"peak RSS {lo['peak_rss_after_import_mib']:.0f} MiB after import -> "
              f"{lo['peak_rss_after_load_mib']:.0f} MiB after load")
        compile_s = ", ".join(f"{v:.1f}s ({k} steps)" for k, v in ge["compile_s"].items())
        a, b = ge["steps"]
        print(f"  {name}: generate {ge['size']}px batch 1 guidance 7.5: compile {compile_s}; per denoising step "
              f"{ge['per_step_unet_s']:.3f}s (UNet on 2 rows, best of 3), {ge['per_step_generate_s']:.3f}s "
              f"(generate {b} vs {a} steps); VAE decode {ge['decode_s']:.2f}s")

if __name__ == "__main__":
    main()
