import pytest

from tests import tiny


@pytest.fixture(scope="session", params=["sd1", "sd2", "sdxl"])
def tiny_pipeline_dir(request, tmp_path_factory):
    """A tiny diffusers pipeline folder of each family (built once per session)."""
    return tiny.build(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Builder of tiny pipeline folders by family, cached for the session."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = tiny.build(kind, tmp_path_factory.mktemp(kind))
        return cache[kind]

    return get


def pytest_configure(config):
    # Until every model exposes init_params the loader relies on; harmless when they do.
    import jax.numpy as jnp

    from tix.models.vae import AutoencoderKL

    if not hasattr(AutoencoderKL, "init_params"):
        AutoencoderKL.init_params = lambda self, rng: self.init(rng, jnp.zeros((1, 16, 16, self.config.in_channels)))[
            "params"
        ]
