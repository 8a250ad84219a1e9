"""Hugging Face Hub ids: telling one from a local path, and fetching a learned-concept repository.

Downloads go through huggingface_hub's cache (HF_HUB_CACHE / HF_HOME), so a concept fetched once loads offline
(HF_HUB_OFFLINE=1) from then on, and the same files serve diffusers' `load_textual_inversion`.
"""

from __future__ import annotations

import os
from pathlib import Path

from tix.errors import TixError

# What a concept repository holds that tix reads: sd-concepts-library's learned_embeds.bin (its token is the file's
# key, as in diffusers; token_identifier.txt repeats it), diffusers' safetensors exports (SDXL: learned_embeds_2 too)
# and single-file A1111/ComfyUI embeddings. Only files at the top level: concept_images/ and model weights stay put.
EMBEDDING_SUFFIXES = (".safetensors", ".bin", ".pt", ".npy")


def is_hub_id(source: str | os.PathLike) -> bool:
    """Whether `source` names a Hub repository ("owner/name") rather than a local or remote path: exactly one slash,
    no scheme, not starting like a path, and no such file or folder here."""
    text = os.fspath(source)
    if "://" in text or text.count("/") != 1 or text.startswith((".", "/", "~")) or text.endswith("/"):
        return False
    return not Path(text).expanduser().exists()


def concept_folder(repo_id: str) -> Path:
    """A local folder holding the embedding files of Hub repository `repo_id` (downloaded, or found in the cache)."""
    import huggingface_hub as hub
    from huggingface_hub import constants as hub_constants

    patterns = [f"*{suffix}" for suffix in EMBEDDING_SUFFIXES] + ["token_identifier.txt"]
    try:
        if hub_constants.HF_HUB_OFFLINE:
            folder = Path(hub.snapshot_download(repo_id))
        else:
            top = [f for f in hub.list_repo_files(repo_id) if "/" not in f]
            wanted = [f for f in top if f.endswith(EMBEDDING_SUFFIXES) or f == "token_identifier.txt"]
            folder = Path(hub.snapshot_download(repo_id, allow_patterns=wanted or patterns))
    except Exception as err:
        raise TixError(
            f"{repo_id}: no such local file or folder, and the Hugging Face Hub could not give it as a concept "
            f"({type(err).__name__}: {err}); check the path or the id and your network (with HF_HUB_OFFLINE=1 it must "
            "already be in the cache)"
        ) from None
    return folder
