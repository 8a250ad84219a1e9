"""tix's Flax AutoencoderKL against PyTorch diffusers with the same weights and inputs."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE

from tix import weights
from tix.errors import ConfigError
from tix.models.vae import AutoencoderKL, VAEConfig, rename_legacy_vae_keys, sample_latent

SD_VAE = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 512, "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
}
SDXL_VAE = {**SD_VAE, "_diffusers_version": "0.20.0.dev0", "force_upcast": True, "scaling_factor": 0.13025,
            "sample_size": 1024}


def _abstract(model: AutoencoderKL):
    return jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0)))


def _compare(torch_vae, model, params, images, latents):
    """Max-abs errors of (mean, logvar, decoded) against diffusers, NCHW torch vs NHWC tix."""
    with torch.no_grad():
        posterior = torch_vae.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist
        ref_mean, ref_logvar = (t.numpy().transpose(0, 2, 3, 1) for t in (posterior.mean, posterior.logvar))
        ref_images = torch_vae.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2))).sample
        ref_images = ref_images.numpy().transpose(0, 2, 3, 1)
    mean, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))(params, images)
    decoded = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))(params, latents)
    assert mean.shape == ref_mean.shape and decoded.shape == ref_images.shape
    return tuple(float(np.abs(np.asarray(a) - b).max()) for a, b in
                 ((mean, ref_mean), (logvar, ref_logvar), (decoded, ref_images)))


def _inputs(batch, size, latent_size, latent_channels, channels=3):
    rng = np.random.default_rng(0)
    images = np.clip(rng.standard_normal((batch, *size, channels)) * 0.7, -1, 1).astype(np.float32)
    latents = rng.standard_normal((batch, *latent_size, latent_channels)).astype(np.float32)
    return images, latents


def test_matches_diffusers(tiny_dirs):
    folder = tiny_dirs("sd1") / "vae"
    config = VAEConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
    model = AutoencoderKL(config)
    state = weights.read_safetensors(folder / "diffusion_pytorch_model.safetensors")
    params = weights.from_torch(state, _abstract(model), component="vae")
    torch_vae = TorchVAE.from_pretrained(folder).eval()
    errors = _compare(torch_vae, model, params, *_inputs(2, (32, 32), (16, 16), config.latent_channels))
    print(f"vae tiny: max-abs err mean {errors[0]:.3g}, logvar {errors[1]:.3g}, decode {errors[2]:.3g}")
    assert max(errors) < 1e-5


def test_variant_options_match_diffusers():
    """No quant convs, no mid-block attention, 3 levels, 2 layers, 3 latent channels, an odd image size."""
    torch.manual_seed(0)
    torch_vae = TorchVAE(
        in_channels=3, out_channels=3, block_out_channels=(8, 16, 16), layers_per_block=2, latent_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=4,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False, shift_factor=0.1159,
    ).eval()
    config = VAEConfig.from_diffusers(dict(torch_vae.config))
    assert not config.use_quant_conv and not config.mid_block_add_attention and config.shift_factor == 0.1159
    model = AutoencoderKL(config)
    state = {k: v.numpy() for k, v in torch_vae.state_dict().items()}
    params = weights.from_torch(state, _abstract(model), component="vae")
    errors = _compare(torch_vae, model, params, *_inputs(1, (19, 22), (5, 6), 3))
    print(f"vae variant: max-abs err mean {errors[0]:.3g}, logvar {errors[1]:.3g}, decode {errors[2]:.3g}")
    assert max(errors) < 1e-5


def test_logvar_is_clipped_like_diffusers():
    small = {**SD_VAE, "block_out_channels": [8], "down_block_types": ["DownEncoderBlock2D"],
             "up_block_types": ["UpDecoderBlock2D"], "layers_per_block": 1, "norm_num_groups": 4}
    torch_vae = TorchVAE.from_config(small).eval()
    # Zero weights and a huge quant_conv bias: logvar (the second half of the moments) lands far outside [-30, 20].
    with torch.no_grad():
        for tensor in torch_vae.parameters():
            tensor.zero_()
        torch_vae.quant_conv.bias[4:] = torch.tensor([1e3, -1e3, 1e3, -1e3])
    model = AutoencoderKL(VAEConfig.from_diffusers(small))
    params = weights.from_torch({k: v.numpy() for k, v in torch_vae.state_dict().items()}, _abstract(model),
                                component="vae")
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))
    _, logvar = encode(params, np.zeros((1, 8, 8, 3), np.float32))
    with torch.no_grad():
        ref = torch_vae.encode(torch.zeros(1, 3, 8, 8)).latent_dist.logvar.permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(ref[0, 0, 0], [20, -30, 20, -30])  # diffusers clamps here
    np.testing.assert_array_equal(np.asarray(logvar), ref)


def test_sample_latent_statistics():
    mean = np.full((4, 32, 32, 4), 0.5, np.float32)
    logvar = np.full_like(mean, np.log(0.25))
    z = np.asarray(sample_latent(jax.random.PRNGKey(0), mean, logvar))
    assert abs(z.mean() - 0.5) < 0.02 and abs(z.std() - 0.5) < 0.02


@pytest.mark.parametrize("config", [SD_VAE, SDXL_VAE, {**SD_VAE, "use_quant_conv": False,
                                                       "use_post_quant_conv": False, "mid_block_add_attention": False}])
def test_parameter_coverage_of_real_config(config):
    """Every tensor of the real SD VAE (meta-device diffusers model) has a tix parameter of the same shape."""
    with torch.device("meta"):
        torch_vae = TorchVAE.from_config(config)
    torch_shapes = {k: tuple(v.shape) for k, v in torch_vae.state_dict().items()}
    model = AutoencoderKL(VAEConfig.from_diffusers(config))
    assert weights.expected_torch_keys(_abstract(model)) == torch_shapes


def test_config_records_pipeline_fields():
    sd, sdxl = VAEConfig.from_diffusers(SD_VAE), VAEConfig.from_diffusers(SDXL_VAE)
    assert sd.scaling_factor == 0.18215 and sdxl.scaling_factor == 0.13025
    assert sd.shift_factor is None and sdxl.force_upcast and sd.force_upcast  # diffusers' default is True
    assert sd.block_out_channels == (128, 256, 512, 512) and sd.layers_per_block == 2


@pytest.mark.parametrize(
    "field,value",
    [
        ("act_fn", "gelu"),
        ("down_block_types", ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]),
        ("up_block_types", ["UpDecoderBlock2D"] * 3),
        ("layers_per_block", [2, 2, 2, 2]),
        ("norm_num_groups", 48),
        ("_class_name", "AsymmetricAutoencoderKL"),
        ("some_future_field", 1),
    ],
)
def test_unsupported_config_values_are_refused(field, value):
    with pytest.raises(ConfigError, match=field):
        VAEConfig.from_diffusers({**SD_VAE, field: value})


def _legacy(state):
    """The old diffusers naming of the mid-block attention, with q/k/v/proj stored as 1x1 convs."""
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for key, value in state.items():
        for new, old in names.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                if key.endswith("weight"):
                    value = value[:, :, None, None]
        out[key] = value
    return out


def test_rename_legacy_vae_keys(tiny_dirs):
    state = dict(weights.read_safetensors(tiny_dirs("sd1") / "vae" / "diffusion_pytorch_model.safetensors"))
    legacy = _legacy(state)
    assert "encoder.mid_block.attentions.0.query.weight" in legacy
    assert legacy["decoder.mid_block.attentions.0.proj_attn.weight"].ndim == 4
    renamed = rename_legacy_vae_keys(legacy)
    assert renamed.keys() == state.keys()
    for key, value in state.items():
        np.testing.assert_array_equal(renamed[key], value)
    assert rename_legacy_vae_keys(state).keys() == state.keys()  # current naming passes through

    config = VAEConfig.from_diffusers(json.loads((tiny_dirs("sd1") / "vae" / "config.json").read_text()))
    abstract = _abstract(AutoencoderKL(config))
    with pytest.raises(weights.WeightsError):
        weights.from_torch(legacy, abstract)
    weights.from_torch(renamed, abstract)  # strict: every tensor used, every parameter found
