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

