"""tix's CLIP text encoder against transformers' CLIPTextModel / CLIPTextModelWithProjection with the same weights."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig as TorchConfig
from transformers import CLIPTextModel as TorchTextModel
from transformers import CLIPTextModelWithProjection as TorchTextModelWithProjection
from transformers.activations import ACT2FN

from tests import tiny
from tix.errors import ConfigError
from tix.models import clip
from tix.tokenizer import load_tokenizer, write_clip_tokenizer
from tix.weights import WeightsError, expected_torch_keys, read_safetensors

TOL = 1e-5  # the README claims ~1e-6
PROMPTS = [
    "a photo of a cat",
    # Long enough to be truncated at 77 tokens: the tokenizer keeps <|endoftext|> at position 76.
    " ".join(tiny.WORDS * 6),
    "oil painting of a small red dog on a green background",
]
# (name, architecture, hidden_act, config eos_token_id, checkpoint key layout)
VARIANTS = {
    # SD 1.x-like: legacy eos 2, saved by transformers 5 (keys without "text_model.")
    "clip-l": (TorchTextModel, "quick_gelu", "legacy", "saved"),
    # SDXL text_encoder_2-like: projection, exact GELU
    "clip-g": (TorchTextModelWithProjection, "gelu", "legacy", "saved"),
    # SD 2.x-like activation, non-legacy eos id, Hub layout ("text_model." prefix plus the position_ids buffer)
    "clip-h": (TorchTextModel, "gelu", "true", "hub"),
}


@pytest.fixture(scope="module", params=["<|endoftext|>", "!"], ids=["pad-eos", "pad-bang"])
def tokenizer(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    write_clip_tokenizer(folder, tiny.WORDS, pad_token=request.param)
    return load_tokenizer(folder)


def _torch_model(cls, act: str, vocab: int, eos_id: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = TorchConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=45, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, hidden_act=act, projection_dim=24, bos_token_id=0, pad_token_id=1,
        eos_token_id=eos_id,
    )
    model = cls(cfg).eval()
    with torch.no_grad():
        # Layer norms start at weight 1 / bias 0 and biases at 0, which would hide a swapped or dropped tensor.
        for name, p in model.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def oracle(request, tokenizer, tmp_path_factory):
    """(torch model, tix config, tix params) for one variant, loaded from a safetensors file."""
    cls, act, eos_rule, layout = VARIANTS[request.param]
    vocab = len(tokenizer)
    eos_id = 2 if eos_rule == "legacy" else tokenizer.eos_token_id
    model = _torch_model(cls, act, vocab, eos_id)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    if layout == "hub":
        from safetensors.torch import save_file

        state = {f"text_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
        state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        save_file(state, str(folder / "model.safetensors"))
    state_dict = read_safetensors(folder / "model.safetensors")
    assert any(k.startswith("text_model.") for k in state_dict) == (layout == "hub" or cls is not TorchTextModel)
    config = clip.CLIPTextConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
    assert config.with_projection == (cls is TorchTextModelWithProjection)
    assert config.pool_token_id == tokenizer.eos_token_id
    return model, config, clip.load_params(state_dict, config)


def _ids(tokenizer) -> np.ndarray:
    full = tokenizer(PROMPTS[1]).input_ids
    assert len(full) > 77  # the long prompt really is truncated
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    assert ids.shape == (3, 77) and ids[1, -1] == tokenizer.eos_token_id
    return ids


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_matches_transformers(oracle, tokenizer):
    model, config, params = oracle
    ids = _ids(tokenizer)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), output_hidden_states=True)
        ref_pooled = (model.text_model if config.with_projection else model)(torch.from_numpy(ids)).pooler_output
    out = clip.CLIPTextModel(config).apply({"params": params}, jnp.asarray(ids), output_hidden_states=True)

    errors = {"last_hidden_state": _max_err(out.last_hidden_state, ref.last_hidden_state),
              "pooled": _max_err(out.pooled, ref_pooled)}
    assert len(out.hidden_states) == len(ref.hidden_states) == config.num_hidden_layers + 1
    for i, (mine, theirs) in enumerate(zip(out.hidden_states, ref.hidden_states, strict=True)):
        errors[f"hidden_states[{i}]"] = _max_err(mine, theirs)
    if config.with_projection:
        errors["text_embeds"] = _max_err(out.text_embeds, ref.text_embeds)
    else:
        assert out.text_embeds is None
    print({k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) < TOL, errors
    # The pooled row really is the first EOS (not the last padding EOS).
    first_eos = np.argmax(ids == tokenizer.eos_token_id, axis=1)
    np.testing.assert_array_equal(out.pooled, np.asarray(out.last_hidden_state)[np.arange(3), first_eos])
    assert first_eos[0] < 76 and first_eos[1] == 76


def test_hidden_states_only_when_asked(oracle, tokenizer):
    _, config, params = oracle
    out = clip.CLIPTextModel(config).apply({"params": params}, jnp.asarray(_ids(tokenizer)))
    assert out.hidden_states is None


def test_inputs_embeds_path_equals_ids_path(oracle, tokenizer):
    _, config, params = oracle
    model = clip.CLIPTextModel(config)
    ids = jnp.asarray(_ids(tokenizer))
    extra = jax.random.normal(jax.random.key(1), (2, config.hidden_size))
    ids = ids.at[:, 2].set(config.vocab_size + 1).at[0, 3].set(config.vocab_size)  # placeholders
    by_ids = model.apply({"params": params}, ids, extra_embeddings=extra, output_hidden_states=True)
    embeds = clip.embed_tokens(clip.token_table(params), ids, extra)
    positions = clip.eos_positions(ids, tokenizer.eos_token_id)
    by_embeds = model.apply({"params": params}, inputs_embeds=embeds, eos_positions=positions,
                            output_hidden_states=True)
    for a, b in zip(jax.tree.leaves(by_ids), jax.tree.leaves(by_embeds), strict=True):
        np.testing.assert_array_equal(a, b)
    # ids given alongside inputs_embeds only locate EOS
    both = model.apply({"params": params}, ids, inputs_embeds=embeds)
    np.testing.assert_array_equal(both.pooled, by_ids.pooled)
    with pytest.raises(ValueError, match="eos_positions"):
        model.apply({"params": params}, inputs_embeds=embeds)


def test_embed_tokens_extra_rows():
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.normal(size=(10, 4)), jnp.float32)
    extra = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    ids = jnp.asarray([[0, 9, 10, 12, 11, 3], [10, 10, 1, 2, 9, 12]])
    want = np.concatenate([table, extra])[np.asarray(ids)]
    np.testing.assert_array_equal(clip.embed_tokens(table, ids, extra), want)
    plain = ids % 10
    np.testing.assert_array_equal(clip.embed_tokens(table, plain), np.asarray(table)[np.asarray(plain)])
    # The table is never concatenated (copied) to append the extra rows.
    jaxpr = str(jax.make_jaxpr(clip.embed_tokens)(table, ids, extra))
    assert "concatenate" not in jaxpr
    # Gradients reach exactly the extra rows the ids use, weighted by how often they are used.
    grad = jax.grad(lambda e: clip.embed_tokens(table, ids, e).sum())(extra)
    np.testing.assert_array_equal(grad[:, 0], [3.0, 1.0, 2.0])


def test_pooled_at_eos_not_at_placeholder(tokenizer):
    """Legacy configs make transformers pool at argmax(ids); with a placeholder id >= vocab that is the placeholder.
    tix pools at the first EOS; the hidden states themselves agree with transformers given the same vectors."""
    vocab = len(tokenizer)
    model = _torch_model(TorchTextModel, "quick_gelu", vocab, eos_id=2, seed=3)
    extra = torch.randn(2, 32) * 0.02
    config = clip.CLIPTextConfig.from_diffusers({**model.config.to_dict(), "architectures": ["CLIPTextModel"]})
    params = clip.load_params({k: v.numpy() for k, v in model.state_dict().items()}, config)

    ids = _ids(tokenizer)
    ids[:, 4] = vocab + 1  # "a photo of <placeholder>" style
    ids[0, 4:6] = [vocab, vocab + 1]
    model.resize_token_embeddings(vocab + 2, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[vocab:] = extra
        ref = model(torch.from_numpy(ids))
    out = clip.CLIPTextModel(config).apply({"params": params}, jnp.asarray(ids), extra_embeddings=jnp.asarray(extra))

    assert _max_err(out.last_hidden_state, ref.last_hidden_state) < TOL
    eos = np.argmax(ids == tokenizer.eos_token_id, axis=1)
    assert _max_err(out.pooled, ref.last_hidden_state.numpy()[np.arange(3), eos]) < TOL
    # transformers pooled at the placeholder, which is a different vector
    np.testing.assert_array_equal(clip.transformers_pool_positions(jnp.asarray(ids), 2), [5, 4, 4])
    assert _max_err(ref.pooler_output, ref.last_hidden_state.numpy()[np.arange(3), [5, 4, 4]]) < TOL
    assert _max_err(out.pooled, ref.pooler_output) > 1e-2


def test_without_placeholders_pooling_rules_agree(tokenizer):
    ids = jnp.asarray(_ids(tokenizer))
    np.testing.assert_array_equal(clip.transformers_pool_positions(ids, 2),
                                  clip.eos_positions(ids, tokenizer.eos_token_id))


@pytest.mark.parametrize("act", ["quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast"])
def test_activations_match_transformers(act):
    x = np.linspace(-8, 8, 2001, dtype=np.float32)
    want = ACT2FN[act](torch.from_numpy(x)).numpy()
    assert _max_err(clip._ACTIVATIONS[act](jnp.asarray(x)), want) < 1e-6


def test_jit_and_bf16(oracle, tokenizer):
    model_t, config, params = oracle
    ids = jnp.asarray(_ids(tokenizer))
    fp32 = clip.CLIPTextModel(config)
    apply = jax.jit(fp32.apply, static_argnames="output_hidden_states")
    out = apply({"params": params}, ids, output_hidden_states=True)
    np.testing.assert_allclose(out.last_hidden_state, fp32.apply({"params": params}, ids).last_hidden_state,
                               atol=1e-5)
    state = {k: v.numpy() for k, v in model_t.state_dict().items()}
    half = clip.load_params(state, config, dtype=jnp.bfloat16)
    assert clip.token_table(half).dtype == jnp.bfloat16
    low = clip.CLIPTextModel(config, dtype=jnp.bfloat16).apply({"params": half}, ids)
    assert low.last_hidden_state.dtype == jnp.bfloat16
    err = _max_err(low.last_hidden_state, out.last_hidden_state)
    print(f"bf16 vs fp32 last_hidden_state max-abs {err:.3f}")
    assert err < 0.1


def test_load_is_strict(oracle):
    model, config, _ = oracle
    state = clip.normalize_torch_keys({k: v.numpy() for k, v in model.state_dict().items()})
    other = clip.CLIPTextConfig(**{**config.__dict__, "with_projection": not config.with_projection})
    with pytest.raises(WeightsError):
        clip.load_params(state, other)
    state.pop("text_model.final_layer_norm.bias")
    with pytest.raises(WeightsError, match="final_layer_norm.bias"):
        clip.load_params(state, config)


# text_encoder/config.json of the real checkpoints (fields as published)
_COMMON = {"attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
           "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model", "vocab_size": 49408,
           "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "torch_dtype": "float32",
           "transformers_version": "4.25.0.dev0"}
REAL = {
    "sd15": {**_COMMON, "architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", "hidden_size": 768,
             "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768},
    "sd21": {**_COMMON, "architectures": ["CLIPTextModel"], "hidden_act": "gelu", "hidden_size": 1024,
             "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512},
    "sdxl-te2": {**_COMMON, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu",
                 "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
                 "projection_dim": 1280},
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_scale_key_coverage(name):
    cfg = REAL[name]
    torch_cfg = TorchConfig.from_dict(cfg)
    cls = TorchTextModelWithProjection if cfg["architectures"] == ["CLIPTextModelWithProjection"] else TorchTextModel
    with torch.device("meta"):
        model = cls(torch_cfg)
    import re

    theirs = {k: tuple(v.shape) for k, v in clip.normalize_torch_keys(model.state_dict()).items()
              if not any(re.fullmatch(p, k) for p in clip.TORCH_IGNORE)}
    config = clip.CLIPTextConfig.from_diffusers(cfg)
    ours = expected_torch_keys(clip.abstract_params(config))
    assert ours == theirs
    assert config.pool_token_id == 49407
    assert ours["text_model.embeddings.token_embedding.weight"] == (49408, cfg["hidden_size"])
    assert clip.token_table(clip.abstract_params(config)).shape == (49408, cfg["hidden_size"])
    shapes = jax.eval_shape(clip.CLIPTextModel(config).init_params, jax.random.key(0))
    assert expected_torch_keys(shapes) == ours


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"hidden_act": "swish"}, "hidden_act"),
        ({"architectures": ["CLIPVisionModel"]}, "architectures"),
        ({"architectures": None}, "architectures"),
        ({"model_type": "clip"}, "model_type"),
        ({"attention_dropout": 0.1}, "attention_dropout"),
        ({"num_attention_heads": 7}, "num_attention_heads"),
    ],
)
def test_bad_config_raises(change, field):
    cfg = {**REAL["sd15"], **change}
    with pytest.raises(ConfigError, match=field) as info:
        clip.CLIPTextConfig.from_diffusers(cfg)
    value = next(iter(change.values()))
    if isinstance(value, str):
        assert value in str(info.value)
