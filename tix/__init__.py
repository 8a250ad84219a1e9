"""tix: textual inversion for Stable Diffusion on JAX.

`tix.load(path)` returns a frozen `tix.StableDiffusion`; see the README for the API.
"""

import logging
from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["CLIP", "StableDiffusion", "load", "load_clip", "__version__"]



def _drop_torch_banner(record: logging.LogRecord) -> bool:
    # tix needs only transformers' tokenizer, which works without torch; transformers announces torch's absence on
    # import through its "transformers" logger, so a filter there drops that one line and nothing else.
    return not str(record.msg).startswith("PyTorch was not found")


logging.getLogger("transformers").addFilter(_drop_torch_banner)

if TYPE_CHECKING:
    from tix.clip_model import CLIP, load_clip
    from tix.loading import load
    from tix.pipeline import StableDiffusion


def __getattr__(name: str):
    # Imported on first use so `import tix` (and its submodules that need only the version) stay cheap.
    if name == "load":
        from tix.loading import load

        return load
    if name == "StableDiffusion":
        from tix.pipeline import StableDiffusion

        return StableDiffusion
    if name in ("load_clip", "CLIP"):
        from tix import clip_model

        return getattr(clip_model, name)
    raise AttributeError(f"module 'tix' has no attribute {name!r}")
