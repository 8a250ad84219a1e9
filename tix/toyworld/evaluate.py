"""Reconstruction and editability of a phrase standing for a concept, read by the toy world's scorer: the paper's
two axes (Gal et al. 2022, Fig. 10) measured by attributes instead of CLIP similarity.

- reconstruction: the share of "a photo of a {phrase}" samples that show every attribute the concept fixes;
- editability: the share of edited prompts ("a {phrase} on a green background", "a small {phrase}", ...) whose
  samples keep the concept and obey the edit;
- obeyed: the share of those edited samples that obey the edit, kept concept or not. This is the paper's own
  editability (CLIP similarity of each image to its prompt with the pseudo-word left out), which rewards a prompt
  followed even where the concept is lost; `editability` asks for both;
- resemblance: the share of reconstruction samples that look like the training images in everything those share:
  the concept and, where the images were taken in one context (`world.concept_images(shared=...)`), that context
  too. The paper's reconstruction (CLIP similarity to the training images) rewards both; without a shared context
  it equals `reconstruction`;
- by_edit: per edit prompt (the phrase written "{}"), how many of its samples obeyed it and how many there were:
  which edits a phrase breaks, where the two shares above say only how often.

A phrase is whatever a method writes for the concept: a learned token, the best caption the world's words allow,
the initializer word, or a random vector's token. Every phrase of a concept is sampled with the same prompts and the
same noise, so methods differ only in the phrase.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from tix.toyworld import scorer, world

if TYPE_CHECKING:
    from tix.pipeline import StableDiffusion


@dataclasses.dataclass(frozen=True)
class Score:
    reconstruction: float
    editability: float
    samples: int  # of each kind
    obeyed: float = float("nan")
    resemblance: float = float("nan")
    by_edit: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # edit -> (obeyed, samples)

    def __add__(self, other: Score) -> Score:
        """The pooled score of two sets of samples."""
        n = self.samples + other.samples

        def pool(a: float, b: float) -> float:
            return (a * self.samples + b * other.samples) / n

        edits = dict(self.by_edit)
        for edit, (hits, count) in other.by_edit.items():
            before = edits.get(edit, (0, 0))
            edits[edit] = (before[0] + hits, before[1] + count)
        return Score(pool(self.reconstruction, other.reconstruction), pool(self.editability, other.editability), n,
                     pool(self.obeyed, other.obeyed), pool(self.resemblance, other.resemblance), edits)


def prompts(concept: world.Concept, phrase: str, samples: int) -> list[tuple[str, dict[str, str], bool]]:
    """`samples` reconstruction prompts then `samples` edit prompts, each with the attributes an image must show and
    whether it is an edit. The edits are drawn from `world.edit_prompts` in an order fixed by the concept's name, so
    every phrase of a concept gets the same edits."""
    recon = [(world.RECONSTRUCTION_TEMPLATE.format(phrase), concept.expected(), False)] * samples
    edits = world.edit_prompts(concept, phrase)
    order = np.random.default_rng(zlib.crc32(concept.name.encode())).permutation(len(edits))
    chosen = [edits[order[j % len(edits)]] for j in range(samples)]
    return recon + [(text, concept.expected(overrides), True) for text, overrides in chosen]


def edit_asks(concept: world.Concept, expected: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Per prompt of `prompts`, the attributes its edit alone asks for (empty for reconstruction prompts): an edit
    only changes attributes the concept leaves free (`world.edit_prompts`)."""
    return [{a: v for a, v in e.items() if a not in concept.fixed} for e in expected]


def tally(images: np.ndarray, expected: Sequence[dict[str, str]], is_edit: Sequence[bool],
          asked: Sequence[dict[str, str]] | None = None, context: dict[str, str] | None = None,
          edits: Sequence[str] | None = None) -> Score:
    """Score generated images against what each prompt asked for; `asked`, per image, the attributes its edit
    alone asks for (`edit_asks`; for `Score.obeyed`, nan without it); `context`, what the training images share
    beyond the concept (`world.shared_context`; for `Score.resemblance`); `edits`, per image, a name for its edit
    prompt (for `Score.by_edit`, with `asked`)."""
    scored = scorer.score(images)
    hits = np.array([scorer.matches(s, e) for s, e in zip(scored, expected, strict=True)])
    edit = np.asarray(is_edit, bool)
    obeyed, by_edit = float("nan"), {}
    if asked is not None:
        follows = np.array([scorer.matches(s, a) for s, a in zip(scored, asked, strict=True)])
        obeyed = float(follows[edit].mean())
        if edits is not None:
            names = np.asarray(edits, object)
            by_edit = {str(name): (int(follows[edit & (names == name)].sum()), int((edit & (names == name)).sum()))
                       for name in dict.fromkeys(names[edit])}
    alike = np.array([scorer.matches(s, {**e, **(context or {})}) for s, e in zip(scored, expected, strict=True)])
    return Score(float(hits[~edit].mean()), float(hits[edit].mean()), int((~edit).sum()), obeyed,
                 float(alike[~edit].mean()), by_edit)


def score_phrase(generate: Callable[[list[str], int], np.ndarray], concept: world.Concept, phrase: str, *,
                 samples: int = 16, seed: int = 0, context: dict[str, str] | None = None) -> Score:
    """Reconstruction and editability of `phrase` for `concept`. `generate(prompts, seed)` returns uint8 images, one
    per prompt (tix's `StableDiffusion.generate`, or a diffusers pipeline for exported tokens); the seed is the
    same for every phrase of a concept. `context`: what the concept's training images shared besides it
    (`world.shared_context`), for `Score.resemblance`."""
    items = prompts(concept, phrase, samples)
    images = generate([p for p, _, _ in items], seed + zlib.crc32(concept.name.encode()) % 100_000)
    expected = [e for _, e, _ in items]
    # Named with the phrase as "{}", so the same edit of different phrases (methods, draws) pools.
    edits = [p for p, _, _ in prompts(concept, "{}", samples)]
    return tally(images, expected, [k for _, _, k in items], edit_asks(concept, expected), context, edits)


def random_vectors(sd: StableDiffusion, seed: int) -> list[np.ndarray]:
    """One vector per text encoder drawn from a normal fitted to the vocabulary's embeddings (per-dimension mean
    and spread): the 'random vector' baseline, a token that names nothing."""
    from tix.models.clip import token_table

    rng = np.random.default_rng(seed)
    out = []
    for side in sd.text:
        table = np.asarray(token_table(sd.params[side.name]), np.float32)
        out.append((table.mean(0) + table.std(0) * rng.standard_normal(table.shape[1]))[None].astype(np.float32))
    return out
