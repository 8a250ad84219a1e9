"""The toy world: a procedural world of shapes with captions, concepts for inversion benchmarks, and a scorer that
reads an image's attributes. numpy only; the model trained on it and the benchmark live beside it.

`model_dir()` is the folder of the pretrained toy-world model that ships inside the package (what
`tix.load("toyworld")` reads); `tix.toyworld.model` holds its configs and training code (imports jax).
"""

from pathlib import Path

from tix.errors import CheckpointError
from tix.toyworld.scorer import matches, score
from tix.toyworld.world import (
    ATTRIBUTES,
    RECONSTRUCTION_TEMPLATE,
    TEMPLATES,
    UNNAMED,
    VALUES,
    Concept,
    Scene,
    benchmark_concepts,
    caption,
    concept_images,
    dataset,
    edit_prompts,
    render,
    render_many,
    sample_concepts,
    sample_scene,
    vocabulary,
)

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "toyworld"


def model_dir() -> Path:
    """The bundled toy-world model: a diffusers StableDiffusionPipeline folder inside the installed package."""
    if not (ASSET_DIR / "model_index.json").is_file():
        raise CheckpointError(
            f"the bundled toy-world model is missing ({ASSET_DIR}/model_index.json not found); the installed tix "
            "package is incomplete (were package data files left out of the build?). Reinstall tix, or rebuild "
            "the model with `python scripts/train_toyworld.py --out tix/assets/toyworld`"
        )
    return ASSET_DIR


__all__ = [
    "ATTRIBUTES",
    "RECONSTRUCTION_TEMPLATE",
    "TEMPLATES",
    "UNNAMED",
    "VALUES",
    "Concept",
    "Scene",
    "benchmark_concepts",
    "caption",
    "concept_images",
    "dataset",
    "edit_prompts",
    "matches",
    "model_dir",
    "render",
    "render_many",
    "sample_concepts",
    "sample_scene",
    "score",
    "vocabulary",
]
