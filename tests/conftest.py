import os

from tests.xla_flags import FAST_COMPILE

# Set before JAX starts its backend; the flags and why: tests/xla_flags.py. A flag the caller set keeps its value.
_given = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_given] + [f for f in FAST_COMPILE.split() if f.split("=")[0] + "=" not in _given]).strip()

import pytest  # noqa: E402

from tests import tiny  # noqa: E402
from tix import host_memory  # noqa: E402

# The test session owns its process, as the tix command does: freed memory is reused rather than faulted in again.
host_memory.keep_freed_memory()


@pytest.fixture(scope="session", autouse=True)
def _private_cache_folder(tmp_path_factory):
    """Compiled steps (tix's persistent compilation cache, on by default) go to this session's own folder, never the
    user's ~/.cache nor a JAX_COMPILATION_CACHE_DIR of theirs; subprocesses the tests start inherit it. Within a
    session a step compiled twice with the same shapes is loaded the second time, whichever xdist worker compiled
    it first: the workers' temporary folders share a parent that belongs to this session alone (entries are
    written atomically, so two workers may write the same one)."""
    previous = {name: os.environ.pop(name, None) for name in ("XDG_CACHE_HOME", "JAX_COMPILATION_CACHE_DIR")}
    base = tmp_path_factory.getbasetemp()
    folder = base.parent / "xdg-cache" if os.environ.get("PYTEST_XDIST_WORKER") else base / "xdg-cache"
    folder.mkdir(exist_ok=True)
    os.environ["XDG_CACHE_HOME"] = str(folder)
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

