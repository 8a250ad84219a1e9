"""Random-weight model folders for `benchmarks/peers.py`: a diffusers folder (safetensors, read by tix and the
PyTorch example) and a Flax copy of it (read by the Flax example), plus a folder of training images.

Runs in the peers' environment (diffusers 0.39 still has the Flax classes; transformers 4.57 the Flax CLIP):

    /work/venvs/peers/bin/python benchmarks/peer_models.py small sd15 --out /work/peers/models

writes OUT/NAME (PyTorch/tix), OUT/NAME-flax (Flax) and OUT/images. Keep OUT outside the repository.
The tokenizer has close to CLIP's 49408 entries, so the examples' `resize_token_embeddings(len(tokenizer))` keeps
a full-size token table (the 49408-row Adam update they pay every step is part of what is measured).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from itertools import product
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.load_and_generate import CLIP_L, SD15_SCHEDULER, SD15_UNET, SD15_VAE  # noqa: E402

SMALL_UNET = dict(SD15_UNET, block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=64,
                  attention_head_dim=4,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), sample_size=32)
SMALL_VAE = dict(SD15_VAE, block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, sample_size=64)
SMALL_CLIP = dict(CLIP_L, hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=4,
                  projection_dim=64)
SHAPES = {"small": (SMALL_UNET, SMALL_VAE, SMALL_CLIP), "sd15": (SD15_UNET, SD15_VAE, CLIP_L)}
ALWAYS = ["a", "photo", "of", "the", "cat", "rendering", "cropped", "clean", "dark", "close", "up", "bright",
          "good", "nice", "small", "weird", "large", "cool", "one"]


def write_tokenizer(folder: Path, size: int = 49408) -> int:
    """A CLIP BPE tokenizer with at most `size` entries (the prompt templates' words each one token)."""
    from tix.tokenizer import write_clip_tokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    filler = ["".join(w) for w in product(letters, repeat=4)]

    def build(n: int) -> int:
        return write_clip_tokenizer(folder, ALWAYS + filler[:n])

    lo, hi = 0, len(filler)
    while lo < hi:  # the most filler words that keep the vocabulary within `size`
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if build(mid) <= size else (lo, mid - 1)
    return build(lo)


def build(name: str, out: Path, flax: bool = True, tokenizer: Path | None = None) -> None:
    """OUT/NAME, and OUT/NAME-flax where `flax`. `tokenizer`: a folder `write_tokenizer` wrote before (writing one
    searches for the filler size, which takes a while)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet_cfg, vae_cfg, clip_cfg = SHAPES[name]
    torch.manual_seed(0)
    tok = Path(tempfile.mkdtemp(prefix="peer-tok-"))
    if tokenizer is None:
        entries = write_tokenizer(tok)
    else:
        shutil.copytree(tokenizer, tok, dirs_exist_ok=True)
        entries = len(CLIPTokenizer.from_pretrained(str(tok)))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**vae_cfg).eval(), text_encoder=CLIPTextModel(CLIPTextConfig(**clip_cfg)).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(str(tok)), unet=UNet2DConditionModel(**unet_cfg).eval(),
        scheduler=PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    target, flax_target = out / name, out / f"{name}-flax"
    for folder in (target, flax_target):
        shutil.rmtree(folder, ignore_errors=True)
    pipe.save_pretrained(target)  # safetensors
    for file in tok.iterdir():  # transformers 5 saves only tokenizer.json; real SD folders carry vocab and merges too
        if not (target / "tokenizer" / file.name).exists():
            shutil.copy(file, target / "tokenizer" / file.name)
    shutil.rmtree(tok)
    if flax:
        _flax_copy(pipe, target, flax_target)
    print(f"{name}: {target}{f' and {flax_target}' if flax else ''} (tokenizer: {entries} entries)")


def _flax_copy(pipe, target: Path, flax_target: Path) -> None:
    """The Flax example's copy of `pipe` (diffusers <= 0.39 and transformers 4 only: later ones have no Flax)."""
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
    from transformers import FlaxCLIPTextModel

    bins = Path(tempfile.mkdtemp(prefix="peer-bin-"))
    pipe.save_pretrained(bins, safe_serialization=False)  # the Flax classes convert from .bin
    FlaxCLIPTextModel.from_pretrained(bins / "text_encoder", from_pt=True).save_pretrained(flax_target / "text_encoder")
    for cls, sub in ((FlaxAutoencoderKL, "vae"), (FlaxUNet2DConditionModel, "unet")):
        model, params = cls.from_pretrained(bins / sub, from_pt=True)
        model.save_pretrained(flax_target / sub, params=params)
    for sub in ("tokenizer", "scheduler"):
        shutil.copytree(target / sub, flax_target / sub)
    shutil.copy(target / "model_index.json", flax_target / "model_index.json")
    shutil.rmtree(bins)


def write_images(folder: Path, n: int = 4, size: int = 512) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        smooth = rng.random((8, 8, 3)) * 255
        Image.fromarray(smooth.astype(np.uint8)).resize((size, size), Image.BILINEAR).save(folder / f"{i}.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="+", choices=sorted(SHAPES))
    p.add_argument("--out", type=Path, required=True, help="a folder outside the repository")
    p.add_argument("--no-flax", dest="flax", action="store_false",
                   help="no Flax copy (for the PyTorch example and tix alone, e.g. with diffusers >= 0.40)")
    p.add_argument("--tokenizer", type=Path, help="copy this tokenizer folder instead of writing one")
    args = p.parse_args()
    if args.out.resolve().is_relative_to(ROOT):
        p.error(f"--out {args.out} is inside the repository; the peers' models stay outside it")
    write_images(args.out / "images")
    for name in args.names:
        build(name, args.out, args.flax, args.tokenizer)


if __name__ == "__main__":
    main()
