"""Tiny Stable Diffusion pipelines built with PyTorch diffusers/transformers (random weights) and saved in diffusers
layout: the oracles tix is compared against. Each family exercises the configuration paths of its real counterpart."""

from __future__ import annotations

import zlib
from pathlib import Path

WORDS = ["a", "an", "the", "photo", "of", "cat", "dog", "painting", "in", "style", "red", "green", "blue", "on",
         "background", "small", "large", "oil", "rendering", "sculpture", "toy", "object"]


def _text_encoder(kind: str, vocab_size: int, *, projection: bool, hidden: int = 32, layers: int = 3, act: str):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(zlib.crc32(kind.encode()))
    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden + 5, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, hidden_act=act, projection_dim=hidden,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,  # the legacy ids real SD checkpoints carry
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def build(kind: str, folder: str | Path) -> Path:
    """Write a tiny `kind` ("sd1", "sd2" or "sdxl") pipeline to `folder` and return it."""
    import tempfile

    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    from tix.tokenizer import write_clip_tokenizer

    folder = Path(folder)
    tok_dir = Path(tempfile.mkdtemp(prefix="tix-tok-"))
    vocab = write_clip_tokenizer(tok_dir, WORDS, pad_token="!" if kind == "sd2" else "<|endoftext|>")
    from tix.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=32, scaling_factor=0.13025 if kind == "sdxl" else 0.18215,
    ).eval()
    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    common = dict(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        norm_num_groups=8,
    )
    if kind == "sd1":
        unet = UNet2DConditionModel(
            **common, cross_attention_dim=32, attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
        text_encoder = _text_encoder(kind, vocab, projection=False, act="quick_gelu")
        scheduler = DDIMScheduler(**betas, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    elif kind == "sd2":
        unet = UNet2DConditionModel(
            **common, cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True,
            upcast_attention=True,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        )
        text_encoder = _text_encoder(kind, vocab, projection=False, act="gelu")
        scheduler = DDIMScheduler(**betas, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                  prediction_type="v_prediction")
    elif kind == "sdxl":
        unet = UNet2DConditionModel(
            **common, cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
            transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        )
        text_encoder = _text_encoder(kind, vocab, projection=False, act="quick_gelu")
        text_encoder_2 = _text_encoder(kind + "2", vocab, projection=True, act="gelu")
        scheduler = EulerDiscreteScheduler(**betas)
    else:
        raise ValueError(kind)
    unet.eval()
    if kind == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=load_tokenizer(tok_dir), unet=unet,
                                         scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder
