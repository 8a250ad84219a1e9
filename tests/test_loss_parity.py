"""The train step's loss, its gradient and its optimizer update against diffusers' textual-inversion recipe in PyTorch.

The PyTorch side is what `examples/textual_inversion/textual_inversion.py` (and `textual_inversion_sdxl.py`) computes:
the placeholder added to the tokenizer, `resize_token_embeddings`, its row set to the initial vector, the text
encoder's hidden states into the UNet, `DDPMScheduler.add_noise`, the target `noise` or `get_velocity`, MSE, autograd
on the embedding table, and `torch.optim.AdamW` over the table followed by restoring every original row.

One deliberate difference, tix's pooled rule (README, "Design"): SDXL's pooled embedding is taken at the first EOS.
The scripts use `text_encoder_2(...)[0]`, which with the checkpoints' legacy `eos_token_id: 2` pools at
`argmax(input_ids)`, i.e. on the placeholder itself; the PyTorch side here pools at the first EOS explicitly instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tix
from train.step import diffusion_loss, make_optimizer

TOKEN = "<thing>"
PROMPTS = ["a photo of a {}", "a red {} on a green background", "{}"]
TIMESTEPS = np.array([3, 420, 999])
N_VECTORS = 2  # a multi-vector token: "<thing> <thing>_1", as the script's --num_vectors names them
LR, WEIGHT_DECAY = 2e-3, 1e-2


def _torch_pipe(folder, kind):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    return cls.from_pretrained(folder, torch_dtype=torch.float32)


def _init_vectors(sd):
    """Per text encoder, N_VECTORS rows: the words "cat" and "dog" (an initializer per vector, as tix's --init)."""
    from tix.models.clip import token_table

    out = []
    for side in sd.text:
        table = np.asarray(token_table(sd.params[side.name]))
        ids = [side.tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("cat", "dog")]
        out.append(table[ids].astype(np.float32))
    return out


def _torch_recipe(pipe, kind, init, x0, noise):
    """diffusers' textual-inversion loss on given draws: per-sample losses, and per text encoder the gradient of the
    mean loss on the new rows, the embedding tables (for the optimizer step) and the new rows' ids."""
    from diffusers import DDPMScheduler

    names = [TOKEN] + [f"{TOKEN}_{i}" for i in range(1, N_VECTORS)]
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if kind == "sdxl":
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    new_ids, ids = [], []
    prompts = [p.format(" ".join(names)) for p in PROMPTS]
    for (tokenizer, encoder), rows in zip(pairs, init, strict=True):
        tokenizer.add_tokens(names)
        token_ids = tokenizer.convert_tokens_to_ids(names)
        encoder.resize_token_embeddings(len(tokenizer))
        table = encoder.get_input_embeddings().weight
        with torch.no_grad():
            table[token_ids] = torch.from_numpy(rows)
        encoder.requires_grad_(False)
        table.requires_grad_(True)
        new_ids.append(token_ids)
        ids.append(tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids)
    pipe.unet.requires_grad_(False)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    latents = torch.from_numpy(x0).permute(0, 3, 1, 2)
    eps = torch.from_numpy(noise).permute(0, 3, 1, 2)
    t = torch.from_numpy(TIMESTEPS)
    noisy = scheduler.add_noise(latents, eps, t)
    kwargs = {}
    if kind == "sdxl":
        first = pairs[0][1](ids[0], output_hidden_states=True)
        second = pairs[1][1](ids[1], output_hidden_states=True)
        context = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        # The pooled rule stated above: the first EOS, not the script's argmax(input_ids).
        eos = (ids[1] == pipe.tokenizer_2.eos_token_id).int().argmax(dim=-1)
        pooled = pairs[1][1].text_projection(second.last_hidden_state[torch.arange(len(prompts)), eos])
        size = x0.shape[1] * pipe.vae_scale_factor
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(len(prompts), 1)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    else:
        context = pairs[0][1](ids[0])[0]
    pred = pipe.unet(noisy, t, context, **kwargs).sample
    target = eps if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, eps, t)
    per_sample = ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
    torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean").backward()
    grads = [enc.get_input_embeddings().weight.grad[i].numpy().copy() for (_, enc), i in zip(pairs, new_ids,
                                                                                            strict=True)]
    tables = [enc.get_input_embeddings().weight for _, enc in pairs]
    return per_sample.detach().numpy(), grads, tables, new_ids


def _rel(got, want):
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_loss_gradient_and_adamw_step_match_diffusers_recipe(kind, tiny_dirs):
    folder = tiny_dirs(kind)
    sd = tix.load(folder)
    assert sd.prediction_type == ("v_prediction" if kind == "sd2" else "epsilon")
    init = _init_vectors(sd)
    sd.add_tokens(TOKEN, init)
    rng = np.random.default_rng(0)
    latent = sd.default_size // sd.vae_scale_factor
    x0 = rng.standard_normal((len(PROMPTS), latent, latent, 4)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)

    ids = tuple(jnp.asarray(i) for i in sd.tokenize([p.format(TOKEN) for p in PROMPTS]))
    vectors = tuple(jnp.asarray(v) for v in init)

    def mean_loss(v):
        per_sample = diffusion_loss(sd, sd.params, v, x0, noise, TIMESTEPS, ids)
        return per_sample.mean(), per_sample

    (_, per_sample), grads = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))(vectors)
    want, want_grads, tables, new_ids = _torch_recipe(_torch_pipe(folder, kind), kind, init, x0, noise)

    loss_err = _rel(per_sample, want)
    grad_errs = [_rel(g, w) for g, w in zip(grads, want_grads, strict=True)]
    print(f"{kind}: per-sample loss {np.round(want, 4)}, max relative error {loss_err:.1e}; "
          f"gradient max relative error {', '.join(f'{e:.1e}' for e in grad_errs)}")
    assert np.abs(np.asarray(per_sample) - want).max() <= 1e-5 * np.abs(want).min()
    assert max(grad_errs) <= 1e-5
    assert all(np.abs(w).max() > 0 for w in want_grads)  # every encoder's new rows receive gradient

    # One optimizer step: torch's AdamW over each whole table, then the script restores every original row; tix's
    # AdamW sees only the new rows, fed the same (torch's) gradient. Then a second update on that gradient, so the
    # moments carry over.
    original = [t.detach().clone() for t in tables]
    torch_opt = torch.optim.AdamW(tables, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)
    optimizer = make_optimizer(LR, 100, weight_decay=WEIGHT_DECAY)
    state = optimizer.init(vectors)
    same = tuple(jnp.asarray(g) for g in want_grads)
    keep = []
    for table, rows in zip(tables, new_ids, strict=True):
        mask = torch.ones(table.shape[0], dtype=torch.bool)
        mask[rows] = False
        keep.append(mask)
    for _ in range(2):
        torch_opt.step()
        with torch.no_grad():
            for table, orig, mask in zip(tables, original, keep, strict=True):
                table[mask] = orig[mask]
        updates, state = optimizer.update(same, state, vectors)
        vectors = jax.tree.map(jnp.add, vectors, updates)
    for got, table, rows, start in zip(vectors, tables, new_ids, init, strict=True):
        moved = table.detach()[rows].numpy()
        err = float(np.abs(np.asarray(got) - moved).max())
        ulp = float(np.spacing(np.abs(moved).max()))
        print(f"{kind}: two AdamW updates, max abs difference {err:.1e} ({err / ulp:.1f} float32 ulp of the rows)")
        # The same update up to float32 rounding: torch decays the row before adding the step, optax adds both at
        # once, so the two differ by a few ulps of the rows (and by far less than the update itself).
        assert err <= 16 * ulp and err <= 1e-4 * float(np.abs(moved - np.asarray(start)).max()), err
        assert np.abs(moved - start).max() > LR  # the rows did move (and by more than one step's decay)
