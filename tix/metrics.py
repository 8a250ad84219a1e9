"""CLIP similarities of the textual-inversion paper (Gal et al. 2022, section 5.1), as pure functions of features.

- image similarity (reconstruction): the mean cosine similarity over every pair (generated image, training image);
- text similarity (editability): the mean cosine similarity between each generated image and its prompt written
  without the pseudo-word.

Features are CLIP's raw projected features (`tix.CLIP.encode_images` / `encode_texts`); normalisation happens here.
"""

from __future__ import annotations

import numpy as np


def normalize(features: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length (float32)."""
    features = np.asarray(features, np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), eps)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N, M] cosine similarities between the rows of `a` [N, D] and `b` [M, D]."""
    return normalize(a) @ normalize(b).T


def image_similarity(generated: np.ndarray, references: np.ndarray) -> float:
    """Mean pairwise cosine similarity between generated and reference image features."""
    return float(cosine_matrix(generated, references).mean())


def text_similarity(images: np.ndarray, text: np.ndarray) -> float:
    """Mean cosine similarity of image features [N, D] to one text feature [D] (or one per image, [N, D])."""
    images, text = normalize(images), normalize(np.atleast_2d(text))
    if text.shape[0] == 1:
        return float((images @ text[0]).mean())
    return float((images * text).sum(-1).mean())


def strip_token(prompt: str) -> str:
    """A prompt template ("{}" for the pseudo-word) written without it, spaces tidied: "a photo of {} on the moon"
    -> "a photo of on the moon", the text the paper's editability compares images with."""
    return " ".join(prompt.replace("{}", " ").split())
