"""Balanced noise levels (`balance_noise_levels`): the weight's math, its wiring into the step's loss, the reference
table's draws (a concept's own, reproducible), and on the shipped toy model the imbalance it corrects."""

import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_train import make_concept, one_and_eight_devices
from tests.test_variants import _stand_in_step, _variant_cfg
from tix.schedule import balanced_level_weight, level_of
from train.level_balance import LEVELS, reference_function
from train.step import diffusion_loss, draw_batch, loss_fn


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_concept(tmp_path_factory.mktemp("balance") / "thing")


def test_weights_divide_by_the_levels_reference_and_average_one_per_concept():
    ref = jnp.asarray(np.stack([np.geomspace(0.25, 0.005, LEVELS), np.full(LEVELS, 3.0)]), jnp.float32)
    t = jnp.tile(jnp.arange(0, 1000, 100) + 7, 2)  # one sample per level per concept, rows concept-major
    w = np.asarray(balanced_level_weight(ref, t, 1000)).reshape(2, LEVELS)
    np.testing.assert_allclose(w.mean(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(w[0] * np.asarray(ref[0]), (w[0] * np.asarray(ref[0]))[0], rtol=1e-5)
    assert w[0, -1] / w[0, 0] == pytest.approx(50.0, rel=1e-4)  # the noisiest level weighs as its loss is small
    np.testing.assert_allclose(w[1], 1.0, rtol=1e-6)  # a flat reference leaves every sample's loss as it was


def test_levels_are_tenths_of_the_schedule():
    t = jnp.asarray([0, 99, 100, 550, 999])
    np.testing.assert_array_equal(level_of(t, LEVELS, 1000), [0, 0, 1, 5, 9])


def test_the_step_weighs_each_sample_by_its_concepts_reference():
    sd, cfg, tables, vectors = _stand_in_step()  # a linear stand-in for the model: the loss's wiring is under test
    cfg = cfg._replace(batch_size=32)
    params = {"table": sd.table}
    ref = jnp.asarray(np.stack([np.geomspace(1.0, 0.01, LEVELS), np.linspace(1.0, 2.0, LEVELS)]), jnp.float32)
    tables = tables._replace(level_loss=ref)
    _, plain_pc = loss_fn(vectors, sd, cfg, params, tables, 11)
    _, per_concept = loss_fn(vectors, sd, cfg._replace(balance_levels=True), params, tables, 11)
    latents, noise, t, ids = draw_batch(tables, cfg, sd.schedule.num_train_timesteps, 11)
    rows = tuple(v.reshape(-1, v.shape[-1]) for v in vectors)
    plain = diffusion_loss(sd, params, rows, sd.scale_latents(latents), noise, t, ids)
    want = jnp.mean((plain * balanced_level_weight(ref, t, 1000)).reshape(2, -1), axis=1)
    np.testing.assert_allclose(per_concept, want, rtol=1e-5)
    assert np.all(np.abs(np.asarray(per_concept - plain_pc)) > 1e-4 * np.asarray(plain_pc))  # the weights did act


def test_the_reference_is_each_concepts_own_reproducible_and_reads_the_vectors():
    sd, cfg, tables, vectors = _stand_in_step(counts=(3, 3))
    params = {"table": sd.table}
    ref = np.asarray(reference_function(sd, cfg)(params, tables, vectors))
    assert ref.shape == (2, LEVELS) and np.all(np.isfinite(ref)) and np.all(ref > 0)
    np.testing.assert_array_equal(ref, np.asarray(reference_function(sd, cfg)(params, tables, vectors)))
    # Concept 0 alone draws what it draws next to concept 1 (its images, prompts and noise are its own).
    sd1, cfg1, tables1, vectors1 = _stand_in_step(counts=(3,))
    np.testing.assert_allclose(np.asarray(reference_function(sd1, cfg1)(params, tables1, vectors1))[0], ref[0],
                               rtol=1e-6)
    moved = (vectors[0] + 1.0,)
    assert np.abs(np.asarray(reference_function(sd, cfg)(params, tables, moved)) - ref).max() > 1e-3


def test_on_the_toy_model_the_clean_levels_loss_dwarfs_the_noisy_ones(tmp_path):
    """The README's case for the option: at the init word, the loss of the cleanest tenth is tens of times the
    noisiest tenth's, so uniform weighting hears little of what the noisy levels decide (colour and layout)."""
    from PIL import Image

    from tix.toyworld import world
    from train.config import TrainConfig
    from train.invert import _load, _step_settings, prepare_concepts
    from train.tables import initial_vectors, step_shapes, wave_tables

    concept = world.Concept("yellow_dotted_triangle", {"shape": "triangle", "colour": "yellow", "pattern": "dotted"})
    for i, img in enumerate(world.concept_images(concept, 5, seed=0)):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    cfg = TrainConfig(model="toyworld", images=str(tmp_path), token="<t>", init="triangle", out=str(tmp_path / "run"))
    sd, resolution = _load(cfg, None)
    prepared = prepare_concepts(sd, cfg)
    shapes = step_shapes(cfg, prepared, 1, 1)
    tables, _ = wave_tables(sd, cfg, prepared, shapes, resolution, range(shapes.slots))
    step_cfg, _ = _step_settings(cfg, resolution)
    vectors = initial_vectors(sd, prepared, shapes.slots, shapes.n_max)
    ref = np.asarray(reference_function(sd, step_cfg)(sd.params, tables, vectors))[0]
    print("reference per tenth:", " ".join(f"{r:.4f}" for r in ref))
    assert ref[0] > 20 * ref[-1]
    assert np.all(np.diff(ref[:8]) < 0)  # falling level by level over the first eight tenths


def test_a_balanced_run_differs_from_a_plain_one_and_resumes_bit_for_bit(tmp_path, tiny_dirs, images):
    import shutil

    from tix.embedding_files import read
    from train.invert import run

    model = tiny_dirs("sd1")
    kw = dict(images=str(images), token="<thing>", balance_noise_levels=True, init_reg=0.0, progressive_every=0,
              per_image_tokens=False)
    full = run(_variant_cfg(model, tmp_path / "full", **kw), progress=False)
    plain = run(_variant_cfg(model, tmp_path / "plain", **{**kw, "balance_noise_levels": False}), progress=False)
    ends = np.asarray(full.state.vectors[0])
    assert np.abs(ends - np.asarray(plain.state.vectors[0])).max() > 1e-6
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    shutil.rmtree(cut / "checkpoints" / "wave-000" / "4")
    (cut / "learned_embeds.safetensors").unlink()
    resumed = run(_variant_cfg(model, cut, resume=True, **kw), progress=False)
    np.testing.assert_array_equal(np.asarray(resumed.state.vectors[0]), ends)
    (exported,) = read(cut / "learned_embeds.safetensors")
    np.testing.assert_array_equal(exported.vectors["text_encoder"], ends[0, :1])


def test_one_and_eight_devices_agree_with_balanced_levels(tmp_path, tiny_dirs, images):
    rel = one_and_eight_devices(tmp_path, tiny_dirs("sd1"), images, 4, ["--set", "balance_noise_levels=true"])
    print(f"1 vs 8 devices, balanced levels: max relative difference {rel:.2e}")
    assert rel < 1e-5


def test_balanced_levels_and_min_snr_are_not_taken_together():
    from tix.errors import ConfigError
    from train.config import TrainConfig

    with pytest.raises(ConfigError, match="balance_noise_levels and min_snr_gamma"):
        TrainConfig(images="x", token="<t>", balance_noise_levels=True, min_snr_gamma=5.0).check()
    TrainConfig(images="x", token="<t>", balance_noise_levels=True, timestep_bias=1.0).check()
