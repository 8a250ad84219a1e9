"""tix's Flax UNet2DConditionModel against PyTorch diffusers with the same weights and inputs."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

from tix import weights
from tix.errors import ConfigError
from tix.models.unet import ConditioningError, UNet2DConditionModel, UNetConfig

SD15 = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21 = {
    **SD15, "_diffusers_version": "0.10.0.dev0", "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
    "dual_cross_attention": False, "num_class_embeds": None, "only_cross_attention": False, "sample_size": 96,
    "upcast_attention": True, "use_linear_projection": True,
}
SDXL = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None, "time_embedding_type": "positional",
    "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
REAL_CONFIGS = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL}


def _load(folder):
    cfg = UNetConfig.from_diffusers(json.loads((folder / "unet" / "config.json").read_text()))
    model = UNet2DConditionModel(cfg)
    abstract = jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0)))
    state = weights.read_safetensors(folder / "unet" / "diffusion_pytorch_model.safetensors")
    return model, weights.from_torch(state, abstract, component="unet")


def _inputs(cfg: UNetConfig, height: int, width: int, timesteps=(10, 900)):
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, height, width, cfg.in_channels)).astype(np.float32)
    context = rng.standard_normal((2, 7, cfg.cross_attention_dim)).astype(np.float32)
    timesteps = np.asarray(timesteps)
    added = None
    if cfg.uses_text_time:
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {
            "text_embeds": rng.standard_normal((2, pooled)).astype(np.float32),
            "time_ids": np.array([[512, 512, 0, 0, 512, 512], [1024, 768, 16, 8, 1024, 1024]], np.float32),
        }
    return sample, timesteps, context, added


def _torch_forward(folder, sample, timesteps, context, added):
    unet = TorchUNet.from_pretrained(folder / "unet").eval()
    kwargs = {}
    if added is not None:
        kwargs["added_cond_kwargs"] = {k: torch.from_numpy(v) for k, v in added.items()}
    with torch.no_grad():
        out = unet(torch.from_numpy(sample.transpose(0, 3, 1, 2)), torch.from_numpy(timesteps),
                   torch.from_numpy(context), **kwargs).sample
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize(
    "kind,size,timesteps",
    [("sd1", (16, 16), (10, 900)), ("sd2", (16, 16), (10, 900)), ("sdxl", (16, 16), (10, 900)),
     ("sd1", (9, 11), (10.25, 733.7))],
)
def test_matches_diffusers(tiny_dirs, kind, size, timesteps):
    """fp32 agreement with diffusers on the tiny families; (9, 11) exercises diffusers' forwarded upsample sizes,
    fractional timesteps the Euler/Karras schedules."""
    folder = tiny_dirs(kind)
    model, params = _load(folder)
    inputs = _inputs(model.config, *size, timesteps=timesteps)
    ref = _torch_forward(folder, *inputs)
    out = np.asarray(jax.jit(model.apply)({"params": params}, *inputs))
    err = np.abs(out - ref).max()
    print(f"unet {kind} {size}: max-abs err {err:.3g} (max |ref| {np.abs(ref).max():.3g})")
    assert out.shape == ref.shape
    assert err < 1e-5


def test_rarer_config_options_match_diffusers():
    """Per-block layers, explicit time_embedding_dim, other kernels, centred input, mid-block scale, sin-first
    embedding with freq_shift 1, asymmetric downsample padding, another norm_eps: one small UNet built in torch."""
    torch.manual_seed(0)
    torch_unet = TorchUNet(
        sample_size=8, in_channels=3, out_channels=5, block_out_channels=(16, 24, 24), layers_per_block=(1, 2, 1),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4,
        norm_eps=1e-6, cross_attention_dim=12, attention_head_dim=(4, 3, 2), transformer_layers_per_block=(2, 1, 1),
        time_embedding_dim=40, conv_in_kernel=5, conv_out_kernel=1, center_input_sample=True,
        mid_block_scale_factor=1.414, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
    ).eval()
    config = UNetConfig.from_diffusers(dict(torch_unet.config))
    model = UNet2DConditionModel(config)
    abstract = jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0)))
    params = weights.from_torch({k: v.numpy() for k, v in torch_unet.state_dict().items()}, abstract)
    sample, timesteps, context, _ = _inputs(config, 10, 7)
    with torch.no_grad():
        ref = torch_unet(torch.from_numpy(sample.transpose(0, 3, 1, 2)), torch.from_numpy(timesteps),
                         torch.from_numpy(context)).sample.numpy().transpose(0, 2, 3, 1)
    out = np.asarray(jax.jit(model.apply)({"params": params}, sample, timesteps, context))
    err = np.abs(out - ref).max()
    print(f"unet rarer options: max-abs err {err:.3g} (max |ref| {np.abs(ref).max():.3g})")
    assert err < 1e-5


# One level (no resampling) with resnets, transformer blocks and SDXL conditioning: the cheapest model to compile,
# for behaviour the tiny diffusers comparisons do not pin down.
MICRO = {
    "block_out_channels": [8], "down_block_types": ["CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D"],
    "layers_per_block": 1, "norm_num_groups": 4, "attention_head_dim": 2, "cross_attention_dim": 8,
    "use_linear_projection": True, "upcast_attention": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 4, "projection_class_embeddings_input_dim": 6 * 4 + 8,
}


def random_params(abstract, seed: int = 0):
    """Random parameters shaped like `abstract`, scaled like PyTorch's defaults, made in numpy: compiling Linen's
    initializers takes far longer on CPU than anything these tests run."""
    rng = np.random.default_rng(seed)

    def make(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
        if name == "scale":
            return (1 + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
        return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(make, abstract)


def _micro(**kwargs):
    model = UNet2DConditionModel(UNetConfig.from_diffusers(MICRO), **kwargs)
    return model, random_params(jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0))))


def test_timesteps_scalar_float_and_int():
    model, params = _micro()
    sample, _, context, added = _inputs(model.config, 4, 4)
    apply = jax.jit(model.apply)
    by_int = apply({"params": params}, sample, np.array([500, 500]), context, added)
    by_scalar = apply({"params": params}, sample, 500, context, added)
    by_float = apply({"params": params}, sample, np.array([500.0, 500.0], np.float32), context, added)
    np.testing.assert_array_equal(np.asarray(by_int), np.asarray(by_scalar))
    np.testing.assert_array_equal(np.asarray(by_int), np.asarray(by_float))
    other = apply({"params": params}, sample, np.array([499, 500]), context, added)
    assert not np.allclose(np.asarray(other)[0], np.asarray(by_int)[0])


def test_sdxl_added_conditioning_is_required():
    model, params = _micro()
    sample, t, context, added = _inputs(model.config, 4, 4)
    with pytest.raises(ConditioningError, match="text_embeds"):
        model.apply({"params": params}, sample, t, context)
    with pytest.raises(ConditioningError, match="time_ids"):
        model.apply({"params": params}, sample, t, context, {"text_embeds": added["text_embeds"]})
    apply = jax.jit(model.apply)
    as_dict = apply({"params": params}, sample, t, context, added)
    as_tuple = apply({"params": params}, sample, t, context, (added["text_embeds"], added["time_ids"]))
    np.testing.assert_array_equal(np.asarray(as_dict), np.asarray(as_tuple))


def test_added_conditioning_refused_without_text_time():
    config = UNetConfig.from_diffusers({**MICRO, "addition_embed_type": None})
    model = UNet2DConditionModel(config)
    sample, t, context, _ = _inputs(config, 4, 4)
    added = {"text_embeds": np.zeros((2, 8), np.float32), "time_ids": np.zeros((2, 6), np.float32)}
    with pytest.raises(ConditioningError):
        model.init(jax.random.PRNGKey(0), sample, t, context, added)


def test_remat_same_outputs_and_gradients():
    model, params = _micro()
    remat_model, remat_params = _micro(remat=True)
    assert jax.tree.structure(remat_params) == jax.tree.structure(params)
    inputs = _inputs(model.config, 4, 4)

    def loss(p, m):
        return jnp.mean(m.apply({"params": p}, *inputs) ** 2)

    plain = jax.jit(jax.value_and_grad(lambda p: loss(p, model)))(params)
    remat = jax.jit(jax.value_and_grad(lambda p: loss(p, remat_model)))(params)
    np.testing.assert_allclose(plain[0], remat[0], rtol=1e-6)
    diffs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max() / (jnp.abs(a).max() + 1e-12)), plain[1], remat[1])
    assert max(jax.tree.leaves(diffs)) < 1e-4


def test_bfloat16_compute_close_to_float32():
    model, params = _micro()  # upcast_attention: attention itself stays float32
    inputs = _inputs(model.config, 4, 4)
    ref = np.asarray(jax.jit(model.apply)({"params": params}, *inputs))
    bf16 = UNet2DConditionModel(model.config, dtype=jnp.bfloat16)
    out = jax.jit(bf16.apply)({"params": params}, *inputs)
    assert out.dtype == jnp.bfloat16
    rel = np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max()
    assert rel < 5e-2


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_parameter_coverage_of_real_configs(name):
    """Every tensor of the real checkpoints (meta-device diffusers model) has a tix parameter of the same shape."""
    config = REAL_CONFIGS[name]
    with torch.device("meta"):
        torch_unet = TorchUNet.from_config(config)
    torch_shapes = {k: tuple(v.shape) for k, v in torch_unet.state_dict().items()}
    model = UNet2DConditionModel(UNetConfig.from_diffusers(config))
    abstract = jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0)))
    assert weights.expected_torch_keys(abstract) == torch_shapes


def test_real_configs_resolve_heads_and_conditioning():
    sd15, sd21, sdxl = (UNetConfig.from_diffusers(c) for c in (SD15, SD21, SDXL))
    # attention_head_dim counts heads (legacy naming): SD 1.5 has 8 heads of 40/80/160, SD 2.x/XL heads of 64.
    assert sd15.num_heads == (8, 8, 8, 8)
    assert [c // h for c, h in zip(sd21.block_out_channels, sd21.num_heads, strict=True)] == [64] * 4
    assert [c // h for c, h in zip(sdxl.block_out_channels, sdxl.num_heads, strict=True)] == [64] * 3
    assert not sd15.use_linear_projection and sd21.use_linear_projection and sd21.upcast_attention
    assert sdxl.uses_text_time and sdxl.transformer_layers_per_block == (1, 2, 10)
    assert not sdxl.upcast_attention  # null in the SDXL config.json
    assert sd15.time_embed_dim == 1280 and sdxl.addition_time_embed_dim == 256


@pytest.mark.parametrize(
    "field,value",
    [
        ("resnet_time_scale_shift", "scale_shift"),
        ("class_embed_type", "timestep"),
        ("num_class_embeds", 10),
        ("cross_attention_dim", [768, 768, 768, 768]),
        ("only_cross_attention", True),
        ("only_cross_attention", [False, True, False, False]),
        ("dual_cross_attention", True),
        ("act_fn", "gelu"),
        ("time_embedding_type", "fourier"),
        ("time_embedding_act_fn", "silu"),
        ("timestep_post_act", "silu"),
        ("time_cond_proj_dim", 256),
        ("encoder_hid_dim", 1024),
        ("encoder_hid_dim_type", "text_proj"),
        ("attention_type", "gated"),
        ("addition_embed_type", "text"),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("down_block_types", ["SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                              "DownBlock2D"]),
        ("up_block_types", ["UpBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
        ("transformer_layers_per_block", [[1, 1], [1, 1], [1, 1], [1, 1]]),
        ("reverse_transformer_layers_per_block", [[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1]]),
        ("num_attention_heads", 8),
        ("dropout", 0.1),
        ("norm_num_groups", None),
        ("conv_in_kernel", 4),
        ("attention_head_dim", [8, 8]),
        ("some_future_field", 1),
    ],
)
def test_unsupported_config_values_are_refused(field, value):
    with pytest.raises(ConfigError, match=field):
        UNetConfig.from_diffusers({**SD15, field: value})


def test_text_time_needs_its_dimensions():
    config = {k: v for k, v in SDXL.items() if k != "projection_class_embeddings_input_dim"}
    with pytest.raises(ConfigError, match="projection_class_embeddings_input_dim"):
        UNetConfig.from_diffusers(config)


def test_missing_fields_take_diffusers_defaults():
    minimal = {"cross_attention_dim": 768}
    cfg = UNetConfig.from_diffusers(minimal)
    assert cfg.block_out_channels == (320, 640, 1280, 1280) and cfg.num_heads == (8,) * 4
    assert cfg.layers_per_block == (2,) * 4 and not cfg.use_linear_projection and cfg.flip_sin_to_cos


@pytest.mark.slow
def test_full_size_sd15_random_weights(monkeypatch):
    """The real SD 1.5 architecture at an 8x8 latent, random weights from torch: relative error within 1e-5 (the
    README's figure is 2.3e-6). Its kernels are large enough for the CPU's im2col convolution, which this test
    checks in a whole model (the tiny models' parity tests run XLA's convolution)."""
    from tix.models import convolution

    im2col_calls = []
    real_im2col = convolution._im2col
    monkeypatch.setattr(convolution, "_im2col", lambda *a, **k: im2col_calls.append(1) or real_im2col(*a, **k))
    torch.manual_seed(0)
    torch_unet = TorchUNet.from_config(SD15).eval()
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    context = rng.standard_normal((1, 77, 768)).astype(np.float32)
    timesteps = np.array([500])
    with torch.no_grad():
        ref = torch_unet(torch.from_numpy(sample.transpose(0, 3, 1, 2)), torch.from_numpy(timesteps),
                         torch.from_numpy(context)).sample.numpy().transpose(0, 2, 3, 1)
    model = UNet2DConditionModel(UNetConfig.from_diffusers(SD15))
    abstract = jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0)))
    params = weights.from_torch({k: v.numpy() for k, v in torch_unet.state_dict().items()}, abstract)
    del torch_unet
    out = np.asarray(jax.jit(model.apply)({"params": params}, sample, timesteps, context))
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    print(f"unet full-size SD 1.5: max-abs err / max |ref| = {rel:.3g}, {len(im2col_calls)} im2col convolutions")
    assert rel < 1e-5
    assert len(im2col_calls) >= 20


def test_attention_takes_cudnn_flash_only_where_it_applies(monkeypatch):
    # On GPU, XLA's attention materialises [B, heads, 4096, 4096] logits at SD 1.5's latents; cuDNN's fused kernel
    # does not. It must be chosen only where it works: half precision, head width a multiple of 8 up to 128, and
    # self-attention of even length (its backward refuses CLIP's 77 tokens).
    from tix.models import attention as A

    def impl(t, s, d, dtype):
        return A._implementation(jnp.zeros((1, t, 2, d), dtype), jnp.zeros((1, s, 2, d), dtype))

    for backend in ("cpu", "tpu"):  # whatever backend runs the test: only a GPU takes cuDNN
        monkeypatch.setattr(A.jax, "default_backend", lambda backend=backend: backend)
        assert impl(4096, 4096, 40, jnp.bfloat16) != "cudnn"
    monkeypatch.setattr(A.jax, "default_backend", lambda: "gpu")
    assert impl(4096, 4096, 40, jnp.bfloat16) == "cudnn"
    assert impl(1024, 1024, 64, jnp.float16) == "cudnn"
    assert impl(4096, 77, 40, jnp.bfloat16) == "xla"  # cross-attention
    assert impl(77, 77, 64, jnp.bfloat16) == "xla"  # the text encoder
    assert impl(4096, 4096, 40, jnp.float32) == "xla"
    assert impl(4096, 4096, 36, jnp.bfloat16) == "xla"
    assert impl(256, 256, 160, jnp.bfloat16) == "xla"
