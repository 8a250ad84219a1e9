"""The toy world: a procedural world of shapes with captions, concepts for inversion benchmarks, and a scorer that
reads an image's attributes. numpy only; the model trained on it and the benchmark live beside it."""

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
    sample_scene,
    vocabulary,
)

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
    "render",
    "render_many",
    "sample_scene",
    "score",
    "vocabulary",
]
