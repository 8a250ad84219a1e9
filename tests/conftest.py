import os

# The suite compiles hundreds of tiny programs that each run for milliseconds: LLVM's optimisation of the CPU code is
# most of their compile time and buys nothing here (about 18% of the training tests' time). XLA's own passes still
# run, and no fast-math is involved, so results are the same arithmetic. Set before JAX starts its backend.
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

import pytest  # noqa: E402

from tests import tiny  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _private_cache_folder(tmp_path_factory):
    """Compiled steps (tix's persistent compilation cache, on by default) go to this session's own folder, never the
    user's ~/.cache nor a JAX_COMPILATION_CACHE_DIR of theirs; subprocesses the tests start inherit it. Within a
    session a step compiled twice with the same shapes is loaded the second time."""
    previous = {name: os.environ.pop(name, None) for name in ("XDG_CACHE_HOME", "JAX_COMPILATION_CACHE_DIR")}
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


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

