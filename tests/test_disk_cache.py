"""tix's disk cache of derived results: keys that change with the code's description, atomic entries, a folder that
can be moved or turned off, and the parameter shapes of a model read back without tracing it."""

import jax
import pytest

from tix import disk_cache
from tix.models import shapes


@pytest.fixture
def folder(tmp_path):
    disk_cache.use(tmp_path / "cache")
    yield tmp_path / "cache"
    disk_cache.use(disk_cache.default_folder())


def test_entries_round_trip_and_keys_follow_the_description(folder):
    a, b = disk_cache.key("step", "lr=0.1"), disk_cache.key("step", "lr=0.2")
    assert a != b and a.startswith("step-") and disk_cache.key("step", "lr=0.1") == a
    assert disk_cache.read(a) is None
    disk_cache.write(a, b"payload")
    assert disk_cache.read(a) == b"payload" and disk_cache.read(b) is None
    assert [p.name for p in folder.iterdir()] == [a]  # no temporary left beside it


def test_the_code_is_part_of_every_key(folder, monkeypatch):
    before = disk_cache.key("params", "UNet(...)")
    monkeypatch.setattr(disk_cache, "code_fingerprint", lambda: "an edited tix")
    assert disk_cache.key("params", "UNet(...)") != before


def test_off_or_unwritable_costs_only_the_time_to_derive_again(tmp_path):
    disk_cache.use(None)
    disk_cache.write("x", b"1")
    assert disk_cache.read("x") is None
    (tmp_path / "file").write_text("a file where the folder should be")
    disk_cache.use(tmp_path / "file" / "cache")
    disk_cache.write("x", b"1")  # no exception
    assert disk_cache.read("x") is None
    disk_cache.use(disk_cache.default_folder())


def test_parameter_shapes_are_traced_once(folder, monkeypatch):
    from tix.models.vae import AutoencoderKL, VAEConfig

    vae = AutoencoderKL(VAEConfig(block_out_channels=(32, 64), norm_num_groups=8))
    traced = shapes.param_shapes(vae)
    assert len(list(folder.glob("params-*"))) == 1

    def never(*args, **kwargs):
        raise AssertionError("traced again")

    monkeypatch.setattr(jax, "eval_shape", never)
    again = shapes.param_shapes(vae)
    assert jax.tree.structure(again) == jax.tree.structure(traced)
    assert all(jax.tree.leaves(jax.tree.map(lambda x, y: (x.shape, x.dtype) == (y.shape, y.dtype), again, traced)))
    with pytest.raises(AssertionError, match="traced again"):  # another module is another entry
        shapes.param_shapes(AutoencoderKL(VAEConfig(block_out_channels=(32, 32), norm_num_groups=8)))
