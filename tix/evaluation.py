"""The paper's evaluation of learned words (Gal et al. 2022, section 5.1), for any model tix loads.

For each subject (a phrase standing for a concept: its learned token, or a caption to compare with) the model draws
`samples` images of the reconstruction prompt ("a photo of {}") and of each edit prompt; CLIP then gives

- image similarity: reconstruction samples against the concept's training images (`tix.metrics.image_similarity`);
- text similarity: each edit prompt's samples against that prompt without the word (`tix.metrics.text_similarity`).

Every subject of a concept kind is drawn with the same noise (the seed depends on the prompt and the sample index,
never on the phrase), so a token and a caption differ only in the phrase. On the toy world the attribute scorer adds
its reconstruction and editability (`tix.toyworld.evaluate`), for a concept read off the training images.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from tix import metrics

if TYPE_CHECKING:
    from tix.clip_model import CLIP
    from tix.pipeline import StableDiffusion
    from tix.toyworld import world

# The paper's reconstruction prompt and the three edit prompts it names (background, style, composition).
RECONSTRUCTION = "a photo of {}"
EDITS = ("a photo of {} on the moon", "an oil painting of {}", "elmo holding a {}")
# The paper evaluates objects only; for styles tix uses its validation prompts (a painting, then two subjects).
STYLE_RECONSTRUCTION = "a painting in the style of {}"
STYLE_EDITS = ("a cat in the style of {}", "a city in the style of {}")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How samples are drawn. Defaults are the paper's: 64 samples per prompt, 50 DDIM steps, guidance 5."""

    samples: int = 64
    steps: int = 50
    guidance: float = 5.0
    sampler: str = "ddim"
    batch: int = 8
    seed: int = 0
    size: int | None = None  # pixels; None: the model's native size (the paper sampled its LDM at 256)

    def __post_init__(self) -> None:
        from tix.errors import ConfigError

        for name in ("samples", "steps", "batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval: {name}={getattr(self, name)} must be at least 1")


@dataclasses.dataclass(frozen=True)
class Subject:
    """A phrase standing for a concept in prompts. `references` are the concept's training images (uint8 HWC)."""

    concept: str
    phrase: str
    references: tuple[np.ndarray, ...] = ()
    style: bool = False

    @property
    def label(self) -> str:
        return self.concept if self.phrase == self.concept else f"{self.concept} as {self.phrase!r}"

    @property
    def templates(self) -> tuple[str, ...]:
        return (STYLE_RECONSTRUCTION, *STYLE_EDITS) if self.style else (RECONSTRUCTION, *EDITS)


@dataclasses.dataclass(frozen=True)
class Batch:
    subject: int
    template: str
    prompts: tuple[str, ...]  # exactly `Protocol.batch` (padded), so one compiled shape serves every batch
    count: int  # real samples in it
    seed: int


def plan(subjects: Sequence[Subject], protocol: Protocol) -> list[Batch]:
    """Every batch to draw: per subject and prompt, `samples` images in chunks of `batch`. The seed is a function of
    the prompt template and the chunk only, so every subject sees the same noise for the same template."""
    batches = []
    for s, subject in enumerate(subjects):
        for template in subject.templates:
            for start in range(0, protocol.samples, protocol.batch):
                count = min(protocol.batch, protocol.samples - start)
                prompt = template.format(subject.phrase)
                seed = protocol.seed + zlib.crc32(template.encode()) % 1_000_000 * 1000 + start // protocol.batch
                batches.append(Batch(s, template, (prompt,) * protocol.batch, count, seed))
    return batches


def draw(sd: StableDiffusion, batches: Sequence[Batch], protocol: Protocol,
         progress: Callable[[int], None] | None = None) -> dict[tuple[int, str], np.ndarray]:
    """Generated uint8 images per (subject index, template)."""
    out: dict[tuple[int, str], list[np.ndarray]] = {}
    for batch in batches:
        images = sd.generate(list(batch.prompts), steps=protocol.steps, guidance=protocol.guidance,
                             sampler=protocol.sampler, seed=batch.seed, size=protocol.size)
        out.setdefault((batch.subject, batch.template), []).append(images[:batch.count])
        if progress is not None:
            progress(batch.count)
    return {key: np.concatenate(parts) for key, parts in out.items()}


def clip_scores(clip: CLIP, subject: Subject, images: dict[str, np.ndarray]) -> dict[str, Any]:
    """CLIP figures of one subject from its samples per template: image similarity of the reconstruction samples
    against the references (when there are any), text similarity of each edit's samples against the edit without
    the word, and their mean."""
    recon, *edits = subject.templates
    texts = clip.encode_texts([metrics.strip_token(t) for t in edits])
    per_prompt: dict[str, dict[str, float]] = {}
    out: dict[str, Any] = {}
    if subject.references:
        references = clip.encode_images(list(subject.references))
        out["image_similarity"] = metrics.image_similarity(clip.encode_images(images[recon]), references)
        per_prompt[recon] = {"image_similarity": out["image_similarity"]}
    for template, text in zip(edits, texts, strict=True):
        per_prompt[template] = {"text_similarity": metrics.text_similarity(clip.encode_images(images[template]), text)}
    out["text_similarity"] = float(np.mean([v["text_similarity"] for k, v in per_prompt.items() if k != recon]))
    out["prompts"] = per_prompt
    return out


def shared_attributes(references: Sequence[np.ndarray]) -> dict[str, str]:
    """Every attribute on which the toy-world scorer reads the same value in all the training images."""
    from tix.toyworld import scorer, world

    read = scorer.score(np.stack(references))
    shared = {}
    for attribute in world.ATTRIBUTES:
        values = {r[attribute] for r in read}
        if len(values) == 1 and None not in values:
            shared[attribute] = values.pop()
    return shared


def toy_concept(name: str, references: Sequence[np.ndarray]) -> world.Concept:
    """The toy-world concept a set of training images shows: every attribute (but the background, which edits
    change) on which the scorer reads the same value in all of them."""
    from tix.errors import TixError
    from tix.toyworld import world

    fixed = {a: v for a, v in shared_attributes(references).items() if a != "background"}
    if not fixed:
        raise TixError(f"{name}: the toy-world scorer finds no attribute all its training images share, so it "
                       "cannot say what a sample of the concept must show")
    return world.Concept(name, fixed)


# Keys of the toy world's samples in `evaluate_subjects`' image dict (their prompts vary per sample).
TOY_RECONSTRUCTION = "toy world: a photo of a {}"
TOY_EDITS = "toy world: edits of {}"


def toy_scores(sd: StableDiffusion, subject: Subject, protocol: Protocol,
               progress: Callable[[int], None] | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """The toy-world scorer's reconstruction and editability of the subject's phrase, with the toy world's own
    prompts (`tix.toyworld.evaluate`) and this protocol's sampler; and the samples (reconstruction, then edits)."""
    from tix.toyworld import evaluate

    concept = toy_concept(subject.concept, subject.references)
    # Images taken against one background: resemblance asks for it too, as image similarity would.
    context = {a: v for a, v in shared_attributes(subject.references).items() if a == "background"}

    drawn = []

    def generate(prompts: list[str], seed: int) -> np.ndarray:
        parts = []
        for start in range(0, len(prompts), protocol.batch):
            chunk = prompts[start:start + protocol.batch]
            padded = chunk + [chunk[-1]] * (protocol.batch - len(chunk))
            parts.append(sd.generate(padded, steps=protocol.steps, guidance=protocol.guidance,
                                     sampler=protocol.sampler, seed=seed + start, size=protocol.size)[:len(chunk)])
            if progress is not None:
                progress(len(chunk))
        drawn.append(np.concatenate(parts))
        return drawn[-1]

    score = evaluate.score_phrase(generate, concept, subject.phrase, samples=protocol.samples, seed=protocol.seed,
                                  context=context)
    return {"reconstruction": score.reconstruction, "resemblance": score.resemblance,
            "editability": score.editability, "edit_obeyed": score.obeyed, "samples": score.samples,
            "attributes": concept.fixed, "shared_context": context,
            "edits_obeyed": {edit: hits / count for edit, (hits, count) in score.by_edit.items()}}, drawn[0]


def evaluate_subjects(sd: StableDiffusion, subjects: Sequence[Subject], protocol: Protocol, *,
                      clip: CLIP | None = None, toyworld: bool = False, progress: bool = True
                      ) -> tuple[list[dict[str, Any]], dict[tuple[int, str], np.ndarray]]:
    """Draw and score every subject; returns one result dict per subject and the samples per (subject index, prompt
    template or `TOY_*` key)."""
    from tqdm import tqdm

    batches = plan(subjects, protocol) if clip is not None else []
    total = sum(b.count for b in batches) + (2 * protocol.samples * len(subjects) if toyworld else 0)
    bar = tqdm(total=total, disable=not progress, desc="eval", unit="img", dynamic_ncols=True)
    try:
        images = draw(sd, batches, protocol, bar.update)
        results = []
        for s, subject in enumerate(subjects):
            result: dict[str, Any] = {"concept": subject.concept, "phrase": subject.phrase,
                                      "references": len(subject.references)}
            if clip is not None:
                result.update(clip_scores(clip, subject, {t: images[s, t] for t in subject.templates}))
            if toyworld:
                result["toyworld"], toy_images = toy_scores(sd, subject, protocol, bar.update)
                images[s, TOY_RECONSTRUCTION] = toy_images[:protocol.samples]
                images[s, TOY_EDITS] = toy_images[protocol.samples:]
            results.append(result)
    finally:
        bar.close()
    return results, images
