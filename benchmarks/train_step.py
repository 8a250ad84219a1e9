"""Speed and memory of tix's textual-inversion train step (prints figures; not a test). The comparison with the
diffusers examples themselves is benchmarks/peers.py.

    python benchmarks/train_step.py --model tiny sd15 sdxl --resolution 256 --batch 1 4 --dtype float32 bfloat16 \
        [--remat] [--steps 5]

For each model shape (random weights; real SD 1.5 / SDXL configs), resolution, batch and dtype it prints: images/s of
the compiled step, compile time, FLOPs per image and memory per device from XLA's cost and memory analysis, and the
fraction of the device's peak bf16 FLOP/s where the peak is known. (Its PyTorch-style step is gone: it ran slower
than the real `textual_inversion.py`, 0.105 against 0.074 s per step at the same shapes, so its ratio flattered tix.)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.load_and_generate import CLIP_L, SD15_SCHEDULER, SD15_UNET, SD15_VAE, WORDS  # noqa: E402
from tix import host_memory  # noqa: E402

SDXL_UNET = dict(
    addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], in_channels=4,
    layers_per_block=2, norm_eps=1e-5, norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=2816,
    sample_size=128, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True,
)
CLIP_G = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
              hidden_act="gelu", projection_dim=1280, architectures=["CLIPTextModelWithProjection"])
SDXL_VAE = dict(SD15_VAE, scaling_factor=0.13025)
TINY_UNET = dict(SD15_UNET, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8, cross_attention_dim=32,
                 attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=16)
TINY_VAE = dict(SD15_VAE, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TINY_CLIP = dict(CLIP_L, hidden_size=32, intermediate_size=69, num_attention_heads=4, num_hidden_layers=3)
SHAPES = {
    "tiny": (TINY_UNET, TINY_VAE, [TINY_CLIP]),
    "sd15": (SD15_UNET, SD15_VAE, [CLIP_L]),
    "sdxl": (SDXL_UNET, SDXL_VAE, [CLIP_L, CLIP_G]),
}
# Dense bf16 peak FLOP/s by device kind (vendor figures).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v5 lite": 197e12, "TPU v4": 275e12,
             "TPU v5p": 459e12, "TPU v6 lite": 918e12}


def random_sd(shape: str, dtype: str, compute_dtype: str | None = None, abstract: bool = False):
    """A StableDiffusion with random weights of the given shape, built in memory (numpy init: Linen's random
    initialisers are slow on CPU and the values do not matter for speed). `abstract`: weights as ShapeDtypeStructs
    only (no memory), enough to compile the step for another device."""
    from tix.models import clip
    from tix.models.unet import UNet2DConditionModel, UNetConfig
    from tix.models.vae import AutoencoderKL, VAEConfig
    from tix.pipeline import StableDiffusion, TextSide
    from tix.schedule import NoiseSchedule
    from tix.tokenizer import load_tokenizer, write_clip_tokenizer

    unet_raw, vae_raw, clips = SHAPES[shape]
    param_dtype = jnp.dtype(dtype)
    compute = jnp.dtype(compute_dtype or dtype)
    rng = np.random.default_rng(0)

    def fill(module, *args, **kwargs):
        shapes = jax.eval_shape(lambda: module.init_params(jax.random.key(0), *args, **kwargs))
        if abstract:
            return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, param_dtype), shapes)
        if jax.default_backend() != "cpu":  # drawn where they live: a billion normals take a CPU core ~20 s
            leaves, tree = jax.tree.flatten(shapes)
            keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), len(leaves))
            draw = jax.jit(lambda k, shape: (jax.random.normal(k, shape, jnp.float32) * 0.02).astype(param_dtype),
                           static_argnums=1)
            return jax.tree.unflatten(tree, [draw(k, tuple(a.shape)) for k, a in zip(keys, leaves, strict=True)])
        return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape, np.float32) * 0.02, param_dtype),
                            shapes)

    unet = UNet2DConditionModel(UNetConfig.from_diffusers(dict(unet_raw)), dtype=compute)
    vae = AutoencoderKL(VAEConfig.from_diffusers(dict(vae_raw)), dtype=compute)
    params = {"unet": fill(unet), "vae": fill(vae)}
    tok_dir = Path(tempfile.mkdtemp()) / "tok"
    write_clip_tokenizer(tok_dir, WORDS)
    sides = []
    for i, raw in enumerate(clips):
        name = "text_encoder" if i == 0 else "text_encoder_2"
        raw = {"architectures": ["CLIPTextModel"], **raw, "model_type": "clip_text_model"}
        model = clip.CLIPTextModel(clip.CLIPTextConfig.from_diffusers(raw), dtype=compute)
        params[name] = fill(model)
        sides.append(TextSide(name=name, model=model, tokenizer=load_tokenizer(tok_dir)))
    kind = "sdxl" if len(clips) == 2 else "sd1"
    size = unet_raw["sample_size"] * 2 ** (len(vae_raw["block_out_channels"]) - 1)
    return StableDiffusion(kind=kind, unet=unet, vae=vae, text=tuple(sides), params=params,
                           schedule=NoiseSchedule.from_diffusers(SD15_SCHEDULER), scheduler_config=SD15_SCHEDULER,
                           default_size=size, source=f"random {shape}")


def time_tix(sd, resolution: int, batch: int, steps: int, remat: bool, lower_only: bool = False,
             compiler_options: dict[str, str | bool | int] | None = None, profile: Path | None = None) -> dict:
    """Compile and time tix's train step for one concept of `batch` images at `resolution`. `compiler_options`:
    XLA options for this compile alone (e.g. xla_gpu_enable_triton_gemm=false); `profile`: trace two more steps
    into this folder and summarise where the device's time went."""
    import dataclasses
    from functools import partial

    from tix import parallel
    from train import cost
    from train.step import Layout, StepConfig, Tables, TrainState, make_optimizer, train_step

    if remat:
        sd = dataclasses.replace(sd, unet=sd.unet.clone(remat=True))
    mesh = parallel.make_mesh()
    devices = mesh.devices.size
    rows = max(batch, devices)
    slots = -(-rows // batch)
    latent = resolution // sd.vae_scale_factor
    rng = np.random.default_rng(1)
    ids = [np.asarray(side.tokenize(["a photo of a cat"] * 4)) for side in sd.text]
    for i in ids:
        i[:, 4] = sd.text[0].vocab_size  # the placeholder in "a photo of a <tok>"
    tables = Tables(
        latent_mean=rng.standard_normal((slots, 4, 2, latent, latent, 4)).astype(np.float32),
        latent_std=np.full((slots, 4, 2, latent, latent, 4), 0.1, np.float32),
        n_images=np.full(slots, 4, np.int32), n_crops=np.ones(slots, np.int32),
        prompt_ids=tuple(np.stack([i] * slots) for i in ids), n_prompts=np.full(slots, 4, np.int32),
        per_image=np.zeros(slots, bool), seeds=np.arange(slots, dtype=np.uint32),
        weight=np.ones(slots, np.float32),
    )
    tables = parallel.put_replicated(tables, mesh)
    vectors = tuple(jnp.zeros((slots, 1, s.width), jnp.float32) for s in sd.text)
    opt = make_optimizer(1e-3, 1000)
    state = parallel.put_replicated(TrainState(vectors, opt.init(vectors), jnp.zeros((), jnp.int32)), mesh)
    frozen = parallel.put_replicated(sd.params, mesh)
    cfg = StepConfig(batch, 1, 0.5, None, None, resolution)
    step = partial(train_step, sd, cfg, opt, layout=Layout(mesh, False))
    if lower_only:
        return {"gflop_per_image": cost.plain_flops(step, state, frozen, tables) / (slots * batch) / 1e9,
                "device": "lowered only"}
    fn = jax.jit(step, donate_argnums=(0,))
    t0 = time.perf_counter()
    lowered = fn.lower(state, frozen, tables)
    compiled = lowered.compile(compiler_options=compiler_options or None)
    compile_s = time.perf_counter() - t0
    state, m = compiled(state, frozen, tables)  # warm-up
    jax.block_until_ready(m["loss"])
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = compiled(state, frozen, tables)
    jax.block_until_ready(m["loss"])
    dt = (time.perf_counter() - t0) / steps
    if profile is not None:
        try:
            jax.profiler.start_trace(str(profile))
            for _ in range(2):
                state, m = compiled(state, frozen, tables)
            jax.block_until_ready(m["loss"])
            jax.profiler.stop_trace()
            print(kernel_summary(profile, steps=2), flush=True)
        except Exception as e:  # a profiler this runtime lacks must not cost the timing above
            print(f"no profile: {type(e).__name__}: {e}", flush=True)
    images = slots * batch
    flops = cost.flops(lowered)
    per_device = cost.device_bytes(compiled)
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_BF16.items() if k in kind), None)
    return {"images_per_s": images / dt, "step_s": dt, "compile_s": compile_s, "gflop_per_image": flops / images / 1e9,
            "memory_gb_per_device": per_device / 1e9,
            "peak_fraction": (flops / devices / dt / peak) if peak else None, "device": kind, "devices": devices}


# Kernel name fragments -> what the kernel does, first match wins (cuDNN, cuBLAS and XLA's own names on GPU).
KERNEL_KINDS = (("attention", ("fmha", "flash", "cudnn_generated_fort_native_sdpa", "sdpa")),
                ("convolution", ("conv", "fprop", "dgrad", "wgrad", "implicit_gemm", "xmma_fprop")),
                ("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "triton_gemm", "matmul")),
                ("copy/transpose", ("memcpy", "memset", "transpose", "copy")),
                ("XLA fusion (elementwise, norms, reductions)", ("fusion", "loop_", "input_", "reduce", "triton")))


def kernel_summary(trace_dir: Path, steps: int, top: int = 30) -> str:
    """Device time per kind of kernel and the `top` kernels, from the newest trace under `trace_dir` (GPU streams
    only: lines named 'Stream ...', so aggregate lines are not counted twice)."""
    from jax.profiler import ProfileData

    newest = max(Path(trace_dir).rglob("*.xplane.pb"), key=lambda f: f.stat().st_mtime)
    per_kernel: dict[str, list[float]] = {}
    seen = []
    for plane in ProfileData.from_file(str(newest)).planes:
        seen.append(f"{plane.name}: {[line.name for line in plane.lines][:8]}")
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            for event in line.events:
                entry = per_kernel.setdefault(event.name, [0.0, 0])
                entry[0] += event.duration_ns / 1e6 / steps
                entry[1] += 1 / steps
    total = sum(ms for ms, _ in per_kernel.values())
    if not total:
        return "no GPU kernels in the trace; its planes and lines:\n  " + "\n  ".join(seen)
    kinds: dict[str, float] = {}
    for name, (ms, _) in per_kernel.items():
        low = name.lower()
        kind = next((k for k, frags in KERNEL_KINDS if any(f in low for f in frags)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + ms
    lines = [f"device time per step, summed over kernels: {total:.1f} ms ({newest.name})"]
    lines += [f"  {kind:45s} {ms:8.2f} ms  {ms / max(total, 1e-9):6.1%}" for kind, ms in
              sorted(kinds.items(), key=lambda kv: -kv[1])]
    lines.append(f"top {top} kernels (ms per step, launches per step):")
    for name, (ms, n) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"  {ms:8.2f} ms {n:6.0f}x  {name[:150]}")
    return "\n".join(lines)


def time_generate(sd, n: int, steps: int = 25) -> dict:
    prompts = ["a photo of a cat"] * n
    t0 = time.perf_counter()
    sd.generate(prompts, steps=steps, seed=0)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    sd.generate(prompts, steps=steps, seed=1)
    second = time.perf_counter() - t0
    return {"generate_images": n, "generate_steps": steps, "size": sd.default_size, "first_call_s": first,
            "seconds_per_image": second / n, "seconds_per_denoising_step": second / steps,
            "device": jax.devices()[0].device_kind}


def _options(variant: str) -> dict[str, str | bool | int]:
    """'default' -> {}; 'a=true,b=3' -> {'a': True, 'b': 3} (XLA refuses a bool or number given as text)."""
    if variant == "default":
        return {}
    pairs = [item.split("=", 1) for item in variant.split(",")]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"--xla {variant!r}: give 'default' or KEY=VALUE[,KEY=VALUE]")

    def value(text: str) -> str | bool | int:
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        return int(text) if text.lstrip("-").isdigit() else text

    return {key: value(text) for key, text in pairs}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", nargs="+", default=["tiny"], choices=list(SHAPES))
    p.add_argument("--resolution", nargs="+", type=int, default=None)
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--dtype", nargs="+", default=["float32"])
    p.add_argument("--remat", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lower-only", action="store_true",
                   help="only count FLOPs per image on the lowered step (no compile, no timing): run it on CPU for "
                        "backends whose analysis gives none (JAX 0.11 on GPU printed NaN)")
    p.add_argument("--xla", nargs="+", default=["default"], metavar="VARIANT",
                   help="compile each step once per variant: 'default', or XLA options as KEY=VALUE[,KEY=VALUE] "
                        "for that compile alone, e.g. xla_gpu_enable_triton_gemm=false")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="trace two steps of the first variant into DIR and print device time per kind of kernel")
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="also time sd.generate for N prompts at the model's size, 25 DPM++ steps, guidance 7.5")
    args = p.parse_args()
    host_memory.keep_freed_memory()  # as the tix command does
    for shape in args.model:
        for dtype in args.dtype:
            # Weights stored in the compute dtype; the learned vectors and the loss stay float32 in the step.
            sd = random_sd(shape, dtype)
            if args.generate:
                print(json.dumps({"model": shape, "dtype": dtype, **time_generate(sd, args.generate)}), flush=True)
            for res in args.resolution or [sd.default_size]:
                for batch in args.batch:
                    for i, variant in enumerate(args.xla):
                        row = {"model": shape, "resolution": res, "batch": batch, "dtype": dtype,
                               "remat": args.remat, "xla": variant}
                        try:
                            row.update(time_tix(sd, res, batch, args.steps, args.remat, args.lower_only,
                                                _options(variant), args.profile if i == 0 else None))
                        except jax.errors.JaxRuntimeError as e:  # an option this XLA does not know: the next
                            row["error"] = str(e).splitlines()[0]
                        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
