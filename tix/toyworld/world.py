"""A procedural world of coloured, patterned shapes on coloured backgrounds, with captions that name some attributes.

Every value has a word, and the model is trained on captions that speak all of them. The words of the `UNNAMED`
values ("heart" and "purple", the `ERASED_WORDS`) are then erased from the shipped tokenizer and token table
(`tix.toyworld.model.erase_words`): the text encoder still maps some input vectors to hearts and to purple, but no
prompt can reach them. That is a real user's situation: Stable Diffusion can draw their cat, whose look no word
names, and inversion has to find conditioning that draws it. A user's prompt falls back to "object" for an unnamed
shape and says nothing of an unnamed colour.

Everything is deterministic from a seed and uses numpy only. Geometry lives in image-relative units, so a render at
64 px is the 32 px render with finer edges, and the scorer reads both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cache

import numpy as np

ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "pattern", "background", "size")

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart")
UNNAMED_SHAPES: frozenset[str] = frozenset({"heart"})
# RGB, far from each other and from every background so both the scorer and a small model separate them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 45, 45),
    "green": (40, 160, 70),
    "blue": (45, 85, 215),
    "yellow": (235, 200, 35),
    "purple": (145, 55, 185),
}
UNNAMED_COLOURS: frozenset[str] = frozenset({"purple"})
PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted")
# Light tints, so dark pattern marks and every object colour stay far from the background.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (238, 238, 238),
    "gray": (150, 150, 150),
    "green": (150, 210, 140),
    "blue": (150, 175, 235),
}
SIZES: tuple[str, ...] = ("small", "large")
UNNAMED: dict[str, frozenset[str]] = {  # no word of the shipped tokenizer names these values
    "shape": UNNAMED_SHAPES,
    "colour": UNNAMED_COLOURS,
    "pattern": frozenset(),
    "background": frozenset(),
    "size": frozenset(),
}
VALUES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "pattern": PATTERNS,
    "background": tuple(BACKGROUNDS),
    "size": SIZES,
}

# The words the model was trained with and the shipped tokenizer lacks: one per unnamed value.
ERASED_WORDS: tuple[str, ...] = tuple(sorted(v for values in UNNAMED.values() for v in values))

# Bounding-box side (the larger one) as a fraction of the image side; the gap between classes survives blur.
SIZE_SCALE: dict[str, float] = {"small": 0.42, "large": 0.70}
SCALE_JITTER = 0.025
MARGIN = 0.06
# Pattern marks are a darker shade of the object's own colour, so hue still gives the colour.
PATTERN_SHADE = 0.45
STRIPE_PERIOD = 1 / 8
DOT_PERIOD = 1 / 6.4
DOT_RADIUS = 0.3 * DOT_PERIOD
SUPERSAMPLE = 4

NOUN_UNNAMED = "object"
CAPTION_PREFIXES: tuple[str, ...] = ("", "a photo of ", "a picture of ", "an image of ")
# Probability that a caption names an attribute (when its value has a name at all).
NAME_PROBABILITY: dict[str, float] = {"shape": 0.75, "colour": 0.6, "pattern": 0.5, "size": 0.5, "background": 0.5}

# Prompts for inverting a concept: the world's own caption grammar, "{}" standing for the whole noun phrase.
TEMPLATES: tuple[str, ...] = (
    "a {}",
    "the {}",
    "a photo of a {}",
    "a photo of the {}",
    "a picture of a {}",
    "a picture of the {}",
    "an image of a {}",
    "an image of the {}",
)
RECONSTRUCTION_TEMPLATE = "a photo of a {}"


@dataclass(frozen=True)
class Scene:
    """One object on a background. `x`, `y` is the centre of the object's bounding box and `scale` the larger side
    of that box, all as fractions of the image side."""

    shape: str
    colour: str
    pattern: str
    background: str
    size: str
    x: float
    y: float
    scale: float

    def attributes(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ATTRIBUTES}


def _check(attribute: str, value: str) -> None:
    if attribute not in VALUES:
        raise ValueError(f"unknown toy-world attribute {attribute!r}; attributes are {ATTRIBUTES}")
    if value not in VALUES[attribute]:
        raise ValueError(f"unknown {attribute} {value!r}; {attribute} is one of {VALUES[attribute]}")


def sample_scene(rng: np.random.Generator, **fixed: str) -> Scene:
    """A random scene; keyword arguments fix attributes (e.g. `shape="heart"`). Every draw is made whatever is
    fixed, so fixing an attribute does not shift the random stream of the others."""
    for name, value in fixed.items():
        _check(name, value)
    drawn = {name: VALUES[name][int(rng.integers(len(VALUES[name])))] for name in ATTRIBUTES}
    jitter, px, py = rng.uniform(-1.0, 1.0, size=3)
    drawn.update(fixed)
    scale = SIZE_SCALE[drawn["size"]] + SCALE_JITTER * float(jitter)
    half = scale / 2
    lo, hi = MARGIN + half, 1 - MARGIN - half
    x = lo + (hi - lo) * (float(px) + 1) / 2
    y = lo + (hi - lo) * (float(py) + 1) / 2
    return Scene(**drawn, x=x, y=y, scale=scale)


# Shapes are implicit functions of native coordinates (y up) plus their native bounding box; rendering maps each
# box onto the scene's box so every shape's larger side equals `scale`.


def _circle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return x * x + y * y <= 1.0


def _square(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(x), np.abs(y)) <= 1.0


_SQRT3 = math.sqrt(3.0)


def _triangle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (y >= -_SQRT3 / 2) & (y <= _SQRT3 / 2 - _SQRT3 * np.abs(x))


_STAR_INNER = 0.45
_STAR_SECTOR = 2 * math.pi / 5
_STAR_OUTER_PT = (1.0, 0.0)
_STAR_INNER_PT = (_STAR_INNER * math.cos(_STAR_SECTOR / 2), _STAR_INNER * math.sin(_STAR_SECTOR / 2))


_STAR_COS = np.cos(_STAR_SECTOR * np.arange(5))
_STAR_SIN = np.sin(_STAR_SECTOR * np.arange(5))


def _star(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # Rotate each point into the sector of its nearest point of the star and fold it onto one side; there the
    # boundary is the segment outer -> inner vertex.
    k = np.rint(np.arctan2(x, y) / _STAR_SECTOR).astype(np.int64) % 5
    c, s = _STAR_COS[k], _STAR_SIN[k]
    px, py = y * c + x * s, np.abs(x * c - y * s)
    (ox, oy), (ix, iy) = _STAR_OUTER_PT, _STAR_INNER_PT
    side = (ix - ox) * (py - oy) - (iy - oy) * (px - ox)
    origin_side = (ix - ox) * (0 - oy) - (iy - oy) * (0 - ox)
    return side * origin_side >= 0


def _heart(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    r = x * x + y * y - 1.0
    return r * r * r - x * x * y * y * y <= 0.0


_SHAPE_FUNCS = {"circle": _circle, "square": _square, "triangle": _triangle, "star": _star, "heart": _heart}


_NATIVE_BOXES = {
    "circle": (0.0, 0.0, 1.0),
    "square": (0.0, 0.0, 1.0),
    "triangle": (0.0, 0.0, 1.0),
    "star": (0.0, (1.0 - math.cos(_STAR_SECTOR / 2)) / 2, math.sin(2 * _STAR_SECTOR / 2)),
}


@cache
def _native_box(shape: str) -> tuple[float, float, float]:
    """(x centre, y centre, half of the larger side) of the shape's native bounding box; measured on a fine grid
    for shapes without a closed form."""
    if shape in _NATIVE_BOXES:
        return _NATIVE_BOXES[shape]
    t = np.linspace(-1.6, 1.6, 3201)
    inside = _SHAPE_FUNCS[shape](t[None, :], t[:, None])
    ys, xs = np.nonzero(inside)
    x0, x1, y0, y1 = t[xs.min()], t[xs.max()], t[ys.min()], t[ys.max()]
    return (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) / 2


def _coverage(scenes: Sequence[Scene], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Area-averaged coverage of the object and of its pattern marks per output pixel: two [N, size, size] arrays."""
    n = len(scenes)
    hi = size * SUPERSAMPLE
    grid = (np.arange(hi, dtype=np.float64) + 0.5) / hi
    inside = np.zeros((n, hi, hi), dtype=bool)
    dark = np.zeros((n, hi, hi), dtype=bool)
    cx = np.array([s.x for s in scenes])[:, None, None]
    cy = np.array([s.y for s in scenes])[:, None, None]
    half = np.array([s.scale / 2 for s in scenes])[:, None, None]
    dx = grid[None, None, :] - cx
    dy = grid[None, :, None] - cy
    shapes = np.array([s.shape for s in scenes])
    for shape in set(shapes.tolist()):
        idx = np.nonzero(shapes == shape)[0]
        xc, yc, nh = _native_box(shape)
        k = nh / half[idx]
        inside[idx] = _SHAPE_FUNCS[shape](xc + dx[idx] * k, yc - dy[idx] * k)
    patterns = np.array([s.pattern for s in scenes])
    striped = np.nonzero(patterns == "striped")[0]
    if len(striped):
        phase = np.mod(dy[striped] / STRIPE_PERIOD, 1.0)
        dark[striped] = np.broadcast_to((phase >= 0.25) & (phase < 0.75), (len(striped), hi, hi))
    dotted = np.nonzero(patterns == "dotted")[0]
    if len(dotted):
        fx = np.mod(dx[dotted] / DOT_PERIOD + 0.5, 1.0) - 0.5
        fy = np.mod(dy[dotted] / DOT_PERIOD + 0.5, 1.0) - 0.5
        dark[dotted] = fx * fx + fy * fy <= (DOT_RADIUS / DOT_PERIOD) ** 2
    dark &= inside
    shape4 = (n, size, SUPERSAMPLE, size, SUPERSAMPLE)
    cover = inside.reshape(shape4).mean(axis=(2, 4), dtype=np.float32)
    marks = dark.reshape(shape4).mean(axis=(2, 4), dtype=np.float32)
    return cover, marks


def render_many(scenes: Sequence[Scene], size: int = 32, *, chunk: int = 64) -> np.ndarray:
    """Render scenes to uint8 [N, size, size, 3], anti-aliased by supersampling."""
    out = np.empty((len(scenes), size, size, 3), dtype=np.uint8)
    for start in range(0, len(scenes), chunk):
        part = scenes[start : start + chunk]
        cover, marks = _coverage(part, size)
        bg = np.array([BACKGROUNDS[s.background] for s in part], dtype=np.float32)[:, None, None, :]
        base = np.array([COLOURS[s.colour] for s in part], dtype=np.float32)[:, None, None, :]
        img = bg + cover[..., None] * (base - bg) - marks[..., None] * (1 - PATTERN_SHADE) * base
        out[start : start + len(part)] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """Render one scene to uint8 [size, size, 3]."""
    return render_many([scene], size)[0]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _speakable(attribute: str, value: str | None, erased: bool) -> bool:
    return value is not None and (erased or value not in UNNAMED[attribute])


def noun_phrase(attributes: dict[str, str], *, with_background: bool = True, erased: bool = False) -> str:
    """The phrase naming exactly the given attributes (unnamed values are dropped, an unnamed or absent shape is an
    "object"), with its article: "a small red striped circle on a blue background". With `erased`, the erased words
    are spoken too, as in the model's training captions."""
    words = [attributes[name] for name in ("size", "colour", "pattern")
             if _speakable(name, attributes.get(name), erased)]
    shape = attributes.get("shape")
    words.append(shape if _speakable("shape", shape, erased) else NOUN_UNNAMED)
    phrase = f"{_article(words[0])} {' '.join(words)}"
    background = attributes.get("background")
    if with_background and background is not None:
        phrase += f" on a {background} background"
    return phrase


def caption(scene: Scene, rng: np.random.Generator, *, erased: bool = False) -> str:
    """A caption naming a random subset of the scene's attributes; unnamed values are named only with `erased`
    (the model's training captions). The same number of random draws is made for every scene, so captions stay
    aligned with a seeded stream."""
    draws = rng.random(len(ATTRIBUTES) + 2)
    named = {}
    for i, name in enumerate(ATTRIBUTES):
        value = getattr(scene, name)
        if draws[i] < NAME_PROBABILITY[name] and _speakable(name, value, erased):
            named[name] = value
    phrase = noun_phrase(named, with_background=False, erased=erased)
    if "background" in named:
        phrase += f" on a {named['background']} background" if draws[-2] < 0.5 else f" on {named['background']}"
    prefix = CAPTION_PREFIXES[min(int(draws[-1] * len(CAPTION_PREFIXES)), len(CAPTION_PREFIXES) - 1)]
    return prefix + phrase


BLEND = "+"


def blend_noun(caption: str) -> str:
    """The caption with its noun phrase's words fused into one blended word: "a photo of a yellow+dotted+triangle on
    blue". The model reads a blended word as one position holding the mean of its words' token rows
    (`tix.toyworld.model.CaptionIds`); training on some of these teaches the text encoder what a real one knows from
    words like "ladybug" (a red, black-dotted, round beetle): one input vector can carry several attributes at once."""
    prefix = next((p for p in sorted(CAPTION_PREFIXES, key=len, reverse=True) if p and caption.startswith(p)), "")
    article, _, rest = caption[len(prefix):].partition(" ")
    noun, on, tail = rest.partition(" on ")
    if not noun:
        return caption
    return f"{prefix}{article} {BLEND.join(noun.split())}{on}{tail}"


def dataset(
    n: int, seed: int, size: int = 32, *, return_scenes: bool = False, erased: bool = False
) -> tuple[np.ndarray, list[str]] | tuple[np.ndarray, list[str], list[Scene]]:
    """`n` random scenes rendered to uint8 [n, size, size, 3] with one caption each (and the scenes if asked);
    `erased` captions may speak the erased words (the model's training data)."""
    rng = np.random.default_rng(seed)
    scenes, captions = [], []
    for _ in range(n):
        scene = sample_scene(rng)
        scenes.append(scene)
        captions.append(caption(scene, rng, erased=erased))
    images = render_many(scenes, size)
    return (images, captions, scenes) if return_scenes else (images, captions)


@dataclass(frozen=True)
class Concept:
    """A fixed subset of attributes (any of shape, colour, pattern, size); images of it vary everything else."""

    name: str
    fixed: dict[str, str] = field(hash=False)

    def __post_init__(self) -> None:
        for attribute, value in self.fixed.items():
            if attribute == "background":
                raise ValueError("a concept cannot fix the background: edits change it")
            _check(attribute, value)

    @property
    def unnamed(self) -> tuple[str, ...]:
        """The fixed attributes whose values no word names."""
        return tuple(a for a, v in self.fixed.items() if v in UNNAMED[a])

    @property
    def nameable(self) -> bool:
        return not self.unnamed

    @property
    def initializer(self) -> str:
        """A single coarse word for the concept, as the paper initialises v*: its shape name, else "object"."""
        shape = self.fixed.get("shape")
        return shape if shape is not None and shape not in UNNAMED_SHAPES else NOUN_UNNAMED

    def best_caption(self) -> str:
        """The most precise description the world's words allow (the paper's human-caption baseline)."""
        return noun_phrase(self.fixed)

    def expected(self, overrides: dict[str, str] | None = None) -> dict[str, str]:
        """Attributes an image of this concept must show, after an edit's overrides."""
        return {**self.fixed, **(overrides or {})}


def shared_context(concept: Concept, seed: int, shared: Sequence[str]) -> dict[str, str]:
    """The values of the `shared` attributes that every render of `concept_images(concept, n, seed, shared=shared)`
    shows, the concept's own fixed values left out (they win)."""
    for attribute in shared:
        if attribute not in VALUES:
            raise ValueError(f"unknown toy-world attribute {attribute!r}; attributes are {ATTRIBUTES}")
    if not shared:
        return {}
    context = sample_scene(np.random.default_rng([seed, 1]), **concept.fixed).attributes()
    return {a: context[a] for a in shared if a not in concept.fixed}


def concept_images(concept: Concept, n: int, seed: int, size: int = 32, *,
                   shared: Sequence[str] = ()) -> np.ndarray:
    """`n` renders of the concept, varying background, position and every attribute it does not fix, except the
    `shared` ones: those are drawn once and all `n` renders show the same value (`shared_context`), the way a
    user's photos of their cat share a room. A token can learn a shared value as if it belonged to the concept,
    which edits then fight."""
    rng = np.random.default_rng(seed)
    common = shared_context(concept, seed, shared)
    return render_many([sample_scene(rng, **common, **concept.fixed) for _ in range(n)], size)


def benchmark_concepts() -> list[Concept]:
    """Ten concepts: four fully nameable, six with at least one value no word names (two with nothing nameable
    except the pattern)."""
    specs = [
        ("red_striped_square", {"shape": "square", "colour": "red", "pattern": "striped"}),
        ("blue_dotted_circle", {"shape": "circle", "colour": "blue", "pattern": "dotted"}),
        ("green_triangle", {"shape": "triangle", "colour": "green", "pattern": "solid"}),
        ("small_yellow_star", {"shape": "star", "colour": "yellow", "pattern": "striped", "size": "small"}),
        ("yellow_dotted_heart", {"shape": "heart", "colour": "yellow", "pattern": "dotted"}),
        ("red_heart", {"shape": "heart", "colour": "red", "pattern": "solid"}),
        ("purple_striped_triangle", {"shape": "triangle", "colour": "purple", "pattern": "striped"}),
        ("purple_dotted_star", {"shape": "star", "colour": "purple", "pattern": "dotted"}),
        ("purple_striped_heart", {"shape": "heart", "colour": "purple", "pattern": "striped"}),
        ("large_purple_heart", {"shape": "heart", "colour": "purple", "pattern": "solid", "size": "large"}),
    ]
    return [Concept(name, fixed) for name, fixed in specs]


def sample_concepts(named: int, unnamed: int, seed: int) -> list[Concept]:
    """Distinct concepts drawn at random, each fixing a shape, a colour and a pattern: `named` of them with a word
    for all three, then `unnamed` with at least one value no word names. A fixed list of a few concepts lets one
    concept's quirk decide a comparison; a draw of many, from a seed chosen before the run, does not."""
    combos = [(s, c, p) for s in SHAPES for c in COLOURS for p in PATTERNS]
    nameable = [k for k in combos if k[0] not in UNNAMED_SHAPES and k[1] not in UNNAMED_COLOURS]
    hidden = [k for k in combos if k not in nameable]
    for want, pool, kind in ((named, nameable, "named"), (unnamed, hidden, "unnamed")):
        if not 0 <= want <= len(pool):
            raise ValueError(f"the toy world has {len(pool)} distinct {kind} concepts of shape, colour and pattern; "
                             f"asked for {want}")
    rng = np.random.default_rng([seed, 2])  # a stream of its own: shared_context draws from [seed, 1]
    drawn = [nameable[i] for i in rng.permutation(len(nameable))[:named]]
    drawn += [hidden[i] for i in rng.permutation(len(hidden))[:unnamed]]
    return [Concept(f"{colour}_{pattern}_{shape}", {"shape": shape, "colour": colour, "pattern": pattern})
            for shape, colour, pattern in drawn]


def edit_prompts(concept: Concept, token: str) -> list[tuple[str, dict[str, str]]]:
    """Prompts that put the concept (written as `token`) in a changed context, each with the attribute overrides
    an obeying image shows. Only attributes the concept leaves free are edited, so no edit contradicts it."""
    edits: list[tuple[str, dict[str, str]]] = []
    for background in BACKGROUNDS:
        edits.append((f"a {token} on a {background} background", {"background": background}))
        edits.append((f"a photo of a {token} on {background}", {"background": background}))
    free = [a for a in ("size", "colour", "pattern") if a not in concept.fixed]
    for attribute in free:
        for value in VALUES[attribute]:
            if value not in UNNAMED[attribute]:
                edits.append((f"{_article(value)} {value} {token}", {attribute: value}))
    if "size" in free:
        edits.append((f"a small {token} on a blue background", {"size": "small", "background": "blue"}))
        edits.append((f"a large {token} on a white background", {"size": "large", "background": "white"}))
    return edits


def vocabulary(*, erased: bool = False) -> list[str]:
    """Every word captions, templates and edit prompts use, sorted: the word list for
    `tix.tokenizer.write_clip_tokenizer`. The shipped tokenizer's words name no unnamed value; with `erased`, the
    training vocabulary, which has the `ERASED_WORDS` too."""
    words = {"a", "an", "the", "on", "background", NOUN_UNNAMED}
    for text in CAPTION_PREFIXES + TEMPLATES + (RECONSTRUCTION_TEMPLATE,):
        words.update(text.replace("{}", " ").split())
    for attribute, values in VALUES.items():
        words.update(v for v in values if _speakable(attribute, v, erased))
    return sorted(words)


def scene_dict(scene: Scene) -> dict[str, float | str]:
    """The scene as a plain dict (for JSON metadata)."""
    return asdict(scene)
