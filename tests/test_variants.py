"""The paper's variants (its Fig. 10) as training options: the L2 pull toward the initial vectors (`init_reg`),
progressive multi-vector tokens (`progressive_every`) and per-image tokens (`per_image_tokens`).

Their math on hand-made inputs and a stand-in model (fast; a concept learns the same alone or next to another), then
one batched run of the tiny model with all three on: resumed bitwise, exporting only the concepts' own vectors."""

import dataclasses
import shutil
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tix.embedding_files import read
from tix.models.clip import embed_tokens
from tix.schedule import NoiseSchedule
from train import data
from train.config import TrainConfig
from train.invert import run
from train.step import (
    StepConfig,
    Tables,
    TrainState,
    active_vectors,
    draw_batch,
    drop_inactive,
    inactive_rows,
    init_regulariser,
    loss_fn,
    make_optimizer,
    train_step,
)

# ---- the regulariser --------------------------------------------------------------------------------------------


def test_init_regulariser_is_the_mean_squared_distance_of_the_vectors_in_use():
    rng = np.random.default_rng(0)
    # Two text encoders (SDXL-like) of widths 3 and 5; 4 rows per slot: concept 0 has 3 vectors of which 2 are on,
    # concept 1 has 1 vector and per-image tokens in rows 1-3 (never regularised).
    v = tuple(rng.standard_normal((2, 4, d)).astype(np.float32) for d in (3, 5))
    v0 = tuple(rng.standard_normal((2, 4, d)).astype(np.float32) for d in (3, 5))
    active = jnp.array([2, 1])
    sq = sum(np.sum((a - b) ** 2, axis=-1) for a, b in zip(v, v0, strict=True))  # [2, 4]: per vector, both encoders
    want = np.array([sq[0, :2].mean(), sq[1, 0]])
    got = init_regulariser(v, v0, active)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # Gradient of sum_k w_k reg_k: 2 w_k (v - v0) / (vectors in use) on those vectors, zero on every other row.
    w = jnp.array([0.5, 2.0])
    grads = jax.grad(lambda x: jnp.sum(w * init_regulariser(x, v0, active)))(v)
    for g, a, b in zip(grads, v, v0, strict=True):
        want_g = np.zeros_like(a)
        want_g[0, :2] = 2 * 0.5 * (a[0, :2] - b[0, :2]) / 2
        want_g[1, :1] = 2 * 2.0 * (a[1, :1] - b[1, :1])
        np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(init_regulariser(v0, v0, active), [0.0, 0.0])


# ---- progressive vectors ----------------------------------------------------------------------------------------


def test_progressive_schedule_switches_one_vector_on_every_n_steps():
    n = jnp.array([3, 1, 2])
    got = np.stack([active_vectors(jnp.int32(s), n, 2) for s in range(7)])
    np.testing.assert_array_equal(got, [[1, 1, 1], [1, 1, 1], [2, 1, 2], [2, 1, 2], [3, 1, 2], [3, 1, 2], [3, 1, 2]])
    np.testing.assert_array_equal(active_vectors(jnp.int32(0), n, 0), n)  # off: every vector from the start
    # Rows 0..n-1 are the concept's vectors; rows past them (per-image tokens, padding) are never held back.
    np.testing.assert_array_equal(inactive_rows(4, n, jnp.array([1, 1, 2])),
                                  [[0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])


BOS, EOS, PAD, VOCAB = 8, 9, 7, 10  # PAD != EOS, as in SD 2.x's tokenizer


def test_inactive_vectors_leave_the_prompt_and_the_rest_closes_up():
    # Slot 1 of 4 rows per slot: its 2 vectors are ids 14, 15; its per-image token (row 2) is id 16.
    row = [BOS, 1, 14, 15, 2, 16, EOS, PAD, PAD]
    ids = jnp.array([row, row, [BOS, 3, EOS] + [PAD] * 6])
    n_vectors = jnp.array([2, 2, 2])
    got = drop_inactive(ids, VOCAB, 4, n_vectors, jnp.array([1, 2, 1]))
    np.testing.assert_array_equal(got, [[BOS, 1, 14, 2, 16, EOS, PAD, PAD, PAD], row, [BOS, 3, EOS] + [PAD] * 6])


def test_a_growing_token_reads_as_a_token_with_fewer_vectors(tiny_dirs):
    """With k of n vectors on, the step's prompt is exactly the tokenization of a k-vector token."""
    import tix

    sd = tix.load(tiny_dirs("sd1"))
    side = sd.text[0]
    sd.add_tokens("<p>", [np.zeros((3, side.width), np.float32)])  # ids vocab + 0..2
    sd.add_tokens("<q>", [np.zeros((2, side.width), np.float32)])  # ids vocab + 3..4
    prompt = "a photo of {} on a red background"
    (p_ids,) = sd.tokenize([prompt.format("<p>")])
    (q_ids,) = sd.tokenize([prompt.format("<q>")])
    q_as_p = np.where(q_ids >= side.vocab_size, q_ids - 3, q_ids)  # <q>'s two ids renamed to <p>'s first two
    got = drop_inactive(jnp.asarray(p_ids), side.vocab_size, 3, jnp.array([3]), jnp.array([2]))
    np.testing.assert_array_equal(got, q_as_p)


# ---- per-image tokens -------------------------------------------------------------------------------------------


def test_per_image_prompts_name_the_token_and_the_image_token():
    names = data.image_tokens("<t>", 3)
    assert names == ["<t>_image0", "<t>_image1", "<t>_image2"]
    rows = data.training_prompts(("a photo of {}", "a {} toy"), "<t>", names)
    assert rows == ["a photo of <t>", "a <t> toy",
                    "a photo of <t> with <t>_image0", "a photo of <t> with <t>_image1",
                    "a photo of <t> with <t>_image2",
                    "a <t> toy with <t>_image0", "a <t> toy with <t>_image1", "a <t> toy with <t>_image2"]
    captions = data.training_prompts(("{} on grass", "{} at night"), "<t>", names[:2], per_image=True)
    assert captions == ["<t> on grass", "<t> at night", "<t> on grass with <t>_image0", "<t> at night with <t>_image1"]
    assert data.training_prompts(("a photo of {}",), "<t>") == ["a photo of <t>"]


def _tables(n_images, n_prompts, per_image, rows, n_vectors=(1, 1), width=4) -> Tables:
    """Hand-made tables: image i's latents are all i, prompt row r's ids start with r."""
    k, i_max = len(n_images), max(n_images)
    mean = np.broadcast_to(np.arange(i_max, dtype=np.float32)[None, :, None, None, None, None], (k, i_max, 2, 2, 2, 1))
    ids = np.zeros((k, rows, 6), np.int32)
    ids[:, :, 0] = np.arange(rows)
    init = (np.zeros((k, max(n_vectors), width), np.float32),)
    return Tables(jnp.asarray(mean), jnp.zeros_like(jnp.asarray(mean)), jnp.array(n_images), jnp.array([1] * k),
                  (jnp.asarray(ids),), jnp.array(n_prompts), jnp.array(per_image),
                  jnp.array(range(k), jnp.uint32), jnp.ones(k), jnp.array(n_vectors), init)


def test_per_image_prompts_are_drawn_with_their_own_image():
    # Concept 0: 2 templates and 3 images (rows 0-1 plain, 2 + t * 3 + i with image i's token); concept 1: 2
    # per-image captions (rows 0-1, caption i of image i; rows 2-3 the same with image i's token).
    tables = _tables([3, 2], [2, 2], [False, True], rows=8)
    plain = StepConfig(64, 1, 0.5, None, None, 16)
    mixed = plain._replace(per_image_mix=0.5)
    lat, noise, t, (ids,) = draw_batch(tables, mixed, 1000, jnp.int32(3))
    img, row = np.asarray(lat[:, 0, 0, 0]).astype(int), np.asarray(ids[:, 0])
    a, b = slice(0, 64), slice(64, 128)
    dual_a = row[a] >= 2
    assert np.all((row[a][dual_a] - 2) % 3 == img[a][dual_a])
    dual_b = row[b] >= 2
    assert np.all(np.where(dual_b, row[b] - 2, row[b]) == img[b])
    print(f"share of prompts naming the image's token: {dual_a.mean():.2f}, {dual_b.mean():.2f} (p = 0.5)")
    assert 0.2 < dual_a.mean() < 0.8 and 0.2 < dual_b.mean() < 0.8  # 64 draws each: +-0.06 is one sd
    # The other draws do not move: images, noise and timesteps as without per-image tokens, and the same prompts
    # wherever the image's token is not named.
    lat0, noise0, t0, (ids0,) = draw_batch(tables, plain, 1000, jnp.int32(3))
    for x, y in ((lat, lat0), (noise, noise0), (t, t0)):
        np.testing.assert_array_equal(x, y)
    same = np.concatenate([~dual_a, ~dual_b])
    np.testing.assert_array_equal(row[same], np.asarray(ids0[:, 0])[same])


# ---- the three in the train step, on a stand-in model ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _StandIn:
    """The parts of a StableDiffusion the train step uses, as a linear model: the 'UNet' adds the mean of the text
    embeddings to the noisy latents, so every placeholder position in a prompt gets a gradient."""

    table: np.ndarray
    kind: str = "sd1"
    schedule: NoiseSchedule = NoiseSchedule()

    @property
    def text(self):
        return (SimpleNamespace(vocab_size=self.table.shape[0]),)

    def scale_latents(self, x):
        return x

    def text_fn(self, params, ids, extra):
        return embed_tokens(params["table"], ids[0], extra[0]), None

    def unet_fn(self, params, noisy, t, context, pooled=None, time_ids=None):
        return noisy + jnp.mean(context, axis=(1, 2))[:, None, None, None]


def _stand_in_step(counts=(3, 3), n_rows=3, **variants):
    """(stand-in model, step config, tables, initial vectors): concepts of `counts` vectors in slots of `n_rows`
    rows, every prompt naming all of its concept's vectors (slot s, vector j is id VOCAB + n_rows s + j)."""
    sd = _StandIn(np.random.default_rng(1).standard_normal((VOCAB, 4)).astype(np.float32))
    k = len(counts)
    tables = _tables([2] * k, [1] * k, [False] * k, rows=1, n_vectors=counts)
    ids = np.full((k, 1, 12), PAD, np.int32)
    init = np.zeros((k, n_rows, 4), np.float32)
    for s, n in enumerate(counts):
        row = [BOS, 1, *(VOCAB + n_rows * s + j for j in range(n)), EOS]
        ids[s, 0, :len(row)] = row
        init[s, :n] = np.random.default_rng(10 + s).standard_normal((n, 4))
    tables = tables._replace(prompt_ids=(jnp.asarray(ids),), init_vectors=(jnp.asarray(init),))
    cfg = StepConfig(4, 1, 0.5, None, None, 16)._replace(**variants)
    return sd, cfg, tables, (jnp.asarray(init),)


def _train(sd, cfg, tables, init, steps, opt):
    step = jax.jit(lambda s: train_step(sd, cfg, opt, s, {"table": sd.table}, tables))
    state = TrainState(init, opt.init(init), jnp.int32(0))
    seen = []
    for _ in range(steps):
        state, _ = step(state)
        seen.append(np.asarray(state.vectors[0]))
    return seen


def test_the_regulariser_joins_each_concepts_loss():
    sd, cfg, tables, init = _stand_in_step()
    moved = (init[0] + 0.1 * jnp.arange(24, dtype=jnp.float32).reshape(2, 3, 4) / 24,)
    assert float(jnp.min(init_regulariser(moved, init, tables.n_vectors))) > 0
    params = {"table": sd.table}
    total0, per0 = loss_fn(moved, sd, cfg, params, tables, jnp.int32(0))
    total, per = loss_fn(moved, sd, cfg._replace(init_reg=0.3), params, tables, jnp.int32(0))
    reg = init_regulariser(moved, init, tables.n_vectors)
    np.testing.assert_allclose(per - per0, 0.3 * reg, rtol=1e-5)
    np.testing.assert_allclose(total - total0, 0.3 * jnp.sum(reg), rtol=1e-5)


def test_vectors_not_yet_on_neither_shape_the_prompt_nor_move():
    sd, cfg, tables, init = _stand_in_step(progressive_every=2)
    opt = make_optimizer(0.1, 10, weight_decay=0.5)  # decay would move every row it is allowed to touch
    seen = _train(sd, cfg, tables, init, 5, opt)
    start = np.asarray(init[0])
    for s, v in enumerate(seen):  # after step s, the vectors on at step s have moved; the others are untouched
        on = min(3, 1 + s // 2)
        moved = np.abs(v - start).max(axis=-1) > 0  # [concept, vector]
        np.testing.assert_array_equal(moved, np.broadcast_to(np.arange(3) < on, (2, 3)), err_msg=f"step {s}")
    # Without progressive_every the same step moves every vector at once.
    (after,) = _train(*_stand_in_step(), 1, opt)
    assert np.all(np.abs(after - np.asarray(init[0])).max(axis=-1) > 0)


def test_a_concept_learns_the_same_alone_or_next_to_a_wider_one():
    """With the regulariser and progressive vectors on, a 2-vector concept sharing the step with a 4-vector one (slots
    of 4 rows) learns what it learns alone (slots of 2 rows): its mask, anchor and prompt are its own."""
    opt = make_optimizer(0.05, 10)
    variants = dict(init_reg=0.7, progressive_every=2)
    together = _train(*_stand_in_step((2, 4), 4, **variants), 4, opt)[-1]
    alone = _train(*_stand_in_step((2,), 2, **variants), 4, opt)[-1]
    np.testing.assert_allclose(together[0, :2], alone[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(together[0, 2:], 0.0)  # rows past its vectors stay empty


# ---- all three in one batched run of the tiny model ---------------------------------------------------------------

VARIANTS = dict(init_reg=0.5, progressive_every=2, per_image_tokens=True, per_image_mix=0.5)


@pytest.fixture(scope="module")
def concept_root(tmp_path_factory):
    from tests.test_train import make_concept

    root = tmp_path_factory.mktemp("variants")
    make_concept(root / "a", 0)
    make_concept(root / "b", 5, n=3)
    (root / "a" / "concept.yaml").write_text("vectors: 3\n")
    (root / "b" / "concept.yaml").write_text("vectors: 2\ninit: dog\n")
    return root


def _variant_cfg(model, out, **kw) -> TrainConfig:
    values = dict(model=str(model), init="cat", out=str(out), validate_every=0, save_every=2, log_every=1, steps=4,
                  batch_size=2, seed=5, **VARIANTS)
    return TrainConfig(**{**values, **kw})


def _checkpoint_vectors(run_dir, step):
    from train.checkpoint import Checkpoints

    state, _ = Checkpoints(run_dir / "checkpoints" / "wave-000", 3).restore(None, step)
    return np.asarray(state["vectors"][0])


def test_variants_train_together_resume_bitwise_and_export_the_tokens_only(tmp_path, tiny_dirs, concept_root):
    import tix

    model = tiny_dirs("sd1")
    both = tmp_path / "both"
    result = run(_variant_cfg(model, both, concepts=str(concept_root)), progress=False)
    # Rows per slot: <a>'s 3 vectors and 4 per-image tokens; <b> has 2 vectors and 3 per-image tokens.
    assert result.state.vectors[0].shape == (2, 7, 32)
    sd = tix.load(model)
    table = np.asarray(sd.params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"])
    word = {w: table[sd.text[0].tokenizer(w, add_special_tokens=False).input_ids[0]] for w in ("cat", "dog")}
    at2, at4 = _checkpoint_vectors(both, 2), np.asarray(result.state.vectors[0])
    ka, kb = result.tokens.index("<a>"), result.tokens.index("<b>")
    # Steps 0-1 train vector 0 only; steps 2-3 vector 1 too; <a>'s vector 2 (on from step 4) never moves.
    for k, w in ((ka, "cat"), (kb, "dog")):
        assert np.abs(at2[k, 0] - word[w]).max() > 0
        np.testing.assert_array_equal(at2[k, 1], word[w])
        assert np.abs(at4[k, 1] - word[w]).max() > 0
    np.testing.assert_array_equal(at4[ka, 2], word["cat"])
    # Per-image tokens start from the token's first vector and learn where their image's prompts name them.
    assert np.abs(at4[ka, 3:7] - word["cat"]).max(axis=-1).max() > 0
    # The exports hold each concept's own vectors, and nothing of the per-image tokens.
    exported = {c.token: c.vectors["text_encoder"] for c in read(both / "embeddings")}
    assert set(exported) == {"<a>", "<b>"}
    np.testing.assert_array_equal(exported["<a>"], at4[ka, :3])
    np.testing.assert_array_equal(exported["<b>"], at4[kb, :2])
    from tix.library import Library

    assert {e.concept.token for e in Library(both / "tokens").entries()} == {"<a>", "<b>"}

    # Resumed from its step-2 checkpoint, the run ends bit for bit where the uninterrupted one did.
    cut = tmp_path / "cut"
    shutil.copytree(both, cut)
    shutil.rmtree(cut / "checkpoints" / "wave-000" / "4")
    shutil.rmtree(cut / "embeddings")
    resumed = run(_variant_cfg(model, cut, concepts=str(concept_root), resume=True), progress=False)
    np.testing.assert_array_equal(np.asarray(resumed.state.vectors[0]), at4)
    for c in read(cut / "embeddings"):
        np.testing.assert_array_equal(c.vectors["text_encoder"], exported[c.token])


def test_variant_settings_are_checked():
    from tix.errors import ConfigError

    base = dict(images="x", token="<t>")
    for bad, match in ((dict(init_reg=-1.0), "init_reg"), (dict(progressive_every=-2), "progressive_every"),
                       (dict(per_image_mix=0.0), "per_image_mix"), (dict(per_image_mix=1.5), "per_image_mix"),
                       (dict(timestep_bias=-1.0), "timestep_bias"),
                       (dict(timestep_bias=float("inf")), "timestep_bias")):
        with pytest.raises(ConfigError, match=match):
            TrainConfig(**base, **bad).check()
    TrainConfig(**base, **VARIANTS).check()
