"""Reads a toy-world image's attributes (shape, colour, pattern, background, size) by plain image analysis.

No learned weights: the background is the median of the border, the object is what lies far from it, its size is
its bounding box, its shape the nearest of a few prototype silhouettes (rendered by the world itself, with a fixed
seed, and normalised by position and spread), its colour a majority vote of its interior pixels over the palette and
its dark shades, and its pattern the period (the stripes' or the dots') and the direction (across rows or both
ways) of the dark marks inside it. Everything runs batched in numpy: a few thousand 32 px images a second on one core.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from tix.toyworld import world

# Distance (RGB in [0, 1]) beyond which a pixel belongs to the object; the closest object pixel to any background
# (purple on gray) is about 0.40 away, mild noise rarely exceeds 0.15.
MASK_THRESHOLD = 0.2
# Bounding-box side (fraction of the image) between the small (about 0.42) and large (about 0.70) classes.
SIZE_THRESHOLD = 0.56
GRID = 20
# Window side in radii of gyration: wide enough for a star's points.
WINDOW_GYRATIONS = 4.6
# A pattern is told by its period as well as its direction: stripes repeat every STRIPE_PERIOD down the image, dots
# every DOT_PERIOD both ways (4 and 5 px at 32 px). Per-pixel power of the dark-mark map at those periods (rows at
# either, columns at the dots') below PERIODIC_POWER means solid: a small solid star's blended edges give the map
# variance but no period, and faint stripes keep their period. Striped when the gradient ratio (near 1 for stripes,
# near 0 for dots) plus the rows' share of stripe-period power over dot-period power passes STRIPE_EVIDENCE: the VAE
# smears dots along their rows, which fools the direction, but not their spacing.
# Both thresholds minimise errors on the toy model's own VAE reconstructions of renders (the sharpest a generated
# image can be; 1800 of them): solids 0.3% misread at 0.008 (by variance alone: 2.7%); stripes 2.0% and dots 1.0%
# at 1.2 (by direction alone: 1.3% and 3.0%). Clean renders: none.
PERIODIC_POWER = 0.008
STRIPE_EVIDENCE = 1.2
_SHADES = (1.0, 0.72, world.PATTERN_SHADE)
_PROTOTYPE_SEED = 7_000_001
# Shape prototypes come crisp and blurred by this many pixels (at 32 px): a generated image is at best the VAE's
# decoding of a render, which rounds a small star's points until only the crisp circle is nearer (57 of 100
# reconstructed small stars read as circles with crisp prototypes alone, none with both).
PROTOTYPE_BLUR_PX = 1.2


def _box3(a: np.ndarray) -> np.ndarray:
    """Sum over each pixel's 3x3 neighbourhood (zero padded) of [N, H, W]."""
    p = np.pad(a, ((0, 0), (1, 1), (1, 1)))
    rows = p[:, :-2] + p[:, 1:-1] + p[:, 2:]
    return rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:]


def _first_last(occupied: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    first = np.argmax(occupied, axis=1)
    last = occupied.shape[1] - 1 - np.argmax(occupied[:, ::-1], axis=1)
    return first, last


def _analyse(images: np.ndarray) -> dict[str, np.ndarray]:
    x = np.asarray(images, dtype=np.float32) / 255.0
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [N, H, W, 3], got shape {x.shape}")
    n, h, w, _ = x.shape
    border = np.concatenate([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)
    bg = np.median(border, axis=1)
    bg_palette = np.array(list(world.BACKGROUNDS.values()), dtype=np.float32) / 255.0
    background = np.argmin(((bg[:, None] - bg_palette[None]) ** 2).sum(-1), axis=1)

    dist = np.sqrt(((x - bg[:, None, None]) ** 2).sum(-1))
    mask = dist > MASK_THRESHOLD
    # Isolated noise pixels would stretch the bounding box; real object pixels have object neighbours.
    mask &= _box3(mask.astype(np.int16)) >= 3
    found = mask.any(axis=(1, 2))

    # Silhouette in a square window around the mask's centroid, as wide as a multiple of its radius of gyration,
    # resampled to GRID x GRID: position- and scale-free, aspect kept. Moments move little under blur and noise,
    # where a bounding box gains or loses a pixel, which for a small square is a tenth of its side.
    near_object = _box3(mask.astype(np.int16)) > 0
    soft = np.clip((dist - 0.08) / 0.2, 0.0, 1.0) * near_object
    mass = np.maximum(soft.sum(axis=(1, 2)), 1e-6)
    iy = np.arange(h, dtype=np.float32)[None, :, None]
    ix = np.arange(w, dtype=np.float32)[None, None, :]
    cy = (soft * iy).sum(axis=(1, 2)) / mass
    cx = (soft * ix).sum(axis=(1, 2)) / mass
    radius2 = (iy - cy[:, None, None]) ** 2 + (ix - cx[:, None, None]) ** 2
    gyration = np.sqrt((soft * radius2).sum(axis=(1, 2)) / mass)
    window = WINDOW_GYRATIONS * gyration
    t = (np.arange(GRID, dtype=np.float32) + 0.5) / GRID - 0.5
    silhouette = _bilinear(soft, cy[:, None] + t[None] * window[:, None], cx[:, None] + t[None] * window[:, None])

    # Size from the bounding box of the mask near the centroid (every shape lies within 2.3 radii of gyration),
    # so stray specks elsewhere cannot stretch it.
    reach = (0.55 * WINDOW_GYRATIONS * gyration + 1.0)[:, None, None]
    central = mask & (radius2 <= reach * reach)
    y0, y1 = _first_last(central.any(axis=2))
    x0, x1 = _first_last(central.any(axis=1))
    extent = np.maximum(y1 - y0 + 1, x1 - x0 + 1).astype(np.float32)
    size = extent / max(h, w) > SIZE_THRESHOLD

    # Interior: the mask shrunk by one pixel per 32 of image side, away from edges blended with the background.
    step = max(1, round(max(h, w) / 32))
    interior = mask.copy()
    for _ in range(step):
        interior &= _box3(interior.astype(np.int16)) == 9
    thin = interior.sum(axis=(1, 2)) < 4
    interior[thin] = mask[thin]

    palette = np.array(list(world.COLOURS.values()), dtype=np.float32) / 255.0
    centres = (palette[:, None, :] * np.array(_SHADES, dtype=np.float32)[None, :, None]).reshape(-1, 3)
    # Squared distances expanded as |c|^2 - 2 x.c (|x|^2 is the same for every centre): one matmul.
    closeness = x.reshape(-1, 3) @ (2 * centres.T) - (centres * centres).sum(-1)
    nearest = (np.argmax(closeness, axis=-1) // len(_SHADES)).reshape(n, h, w)
    votes = np.stack([(interior & (nearest == c)).sum(axis=(1, 2)) for c in range(len(palette))], axis=1)
    colour = np.argmax(votes, axis=1)

    # Dark-mark map: 0 where the pixel is the object's full colour, 1 at the pattern's dark shade, read as the
    # pixel's projection on its colour relative to the brightest interior pixels (robust to a shifted palette).
    base = palette[colour][:, None, None, :]
    proj = (x * base).sum(-1) / (base * base).sum(-1)
    ref = _masked_quantile(proj, interior, 0.9)
    darkness = np.clip((ref[:, None, None] - proj) / (ref[:, None, None] * (1 - world.PATTERN_SHADE)), 0.0, 1.0)
    stripe_power, dot_rows, dot_cols = _periodic_power(darkness, interior)
    solid = np.maximum(stripe_power, dot_rows) + dot_cols < PERIODIC_POWER
    period_share = stripe_power / np.maximum(stripe_power + dot_rows, 1e-12)
    striped = ~solid & (_gradient_ratio(darkness, interior, step) + period_share > STRIPE_EVIDENCE)
    pattern = np.where(solid, 0, np.where(striped, 1, 2))
    return {
        "found": found,
        "background": background,
        "size": size,
        "silhouette": silhouette,
        "colour": colour,
        "pattern": pattern,
        "extent": extent / max(h, w),
    }


def _bilinear(img: np.ndarray, sy: np.ndarray, sx: np.ndarray) -> np.ndarray:
    """Sample [N, H, W] at rows sy [N, G] x columns sx [N, G] (pixel-centre coordinates), zero outside."""
    n, h, w = img.shape
    padded = np.pad(img, ((0, 0), (1, 1), (1, 1)))
    fy = np.clip(sy + 1, 0, h + 0.999)
    fx = np.clip(sx + 1, 0, w + 0.999)
    iy, ix = np.floor(fy).astype(np.int64), np.floor(fx).astype(np.int64)
    wy, wx = (fy - iy)[:, :, None], (fx - ix)[:, None, :]
    iy1, ix1 = np.minimum(iy + 1, h + 1), np.minimum(ix + 1, w + 1)
    b = np.arange(n)[:, None, None]
    a00 = padded[b, iy[:, :, None], ix[:, None, :]]
    a01 = padded[b, iy[:, :, None], ix1[:, None, :]]
    a10 = padded[b, iy1[:, :, None], ix[:, None, :]]
    a11 = padded[b, iy1[:, :, None], ix1[:, None, :]]
    return (a00 * (1 - wx) + a01 * wx) * (1 - wy) + (a10 * (1 - wx) + a11 * wx) * wy


def _masked_quantile(values: np.ndarray, mask: np.ndarray, q: float) -> np.ndarray:
    """Per-image q-quantile (nearest rank) of `values` where `mask`; 1 where the mask is empty."""
    flat = np.where(mask, values, -np.inf).reshape(len(values), -1)
    ordered = np.sort(flat, axis=1)
    count = mask.reshape(len(values), -1).sum(axis=1)
    rank = flat.shape[1] - count + np.floor(q * np.maximum(count - 1, 0)).astype(np.int64)
    picked = ordered[np.arange(len(values)), np.minimum(rank, flat.shape[1] - 1)]
    return np.where(count > 0, picked, 1.0).astype(np.float32)


def _periodic_power(d: np.ndarray, inside: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Power per interior pixel of the dark-mark map's row profile at the stripe and the dot period, and of its
    column profile at the dot period: [N] each, about A^2 / 4 for marks of contrast A, whatever the object's size."""
    w = inside.astype(np.float32)
    count = np.maximum(w.sum(axis=(1, 2)), 1.0)
    centred = (d - ((d * w).sum(axis=(1, 2)) / count)[:, None, None]) * w
    side = d.shape[1]

    def power(profile: np.ndarray, period: float) -> np.ndarray:
        wave = np.exp(-2j * np.pi * np.arange(profile.shape[1]) / (period * side))
        return np.abs(profile @ wave) ** 2 / count**2

    rows, cols = centred.sum(axis=2), centred.sum(axis=1)
    return power(rows, world.STRIPE_PERIOD), power(rows, world.DOT_PERIOD), power(cols, world.DOT_PERIOD)


def _gradient_ratio(d: np.ndarray, inside: np.ndarray, step: int) -> np.ndarray:
    """(Gy - Gx) / (Gy + Gx) of the dark-mark map inside the object: near 1 for horizontal stripes, near 0 for dots.
    Differences are taken `step` pixels apart (one 32 px pixel) after averaging over 3 * step pixels across their
    direction, which keeps a stripe's edge and cuts noise."""
    w = inside.astype(np.float32)
    width = 3 * step

    def line_mean(a: np.ndarray, axis: int) -> np.ndarray:
        pad = [(0, 0)] * 3
        pad[axis] = (width // 2, width - 1 - width // 2)
        n = a.shape[axis]
        sums = [np.cumsum(np.pad(v, pad), axis=axis) for v in (a, w)]
        window = []
        for c in sums:
            c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), c], axis=axis)
            window.append(np.take(c, np.arange(width, width + n), axis=axis) - np.take(c, np.arange(n), axis=axis))
        return window[0] / np.maximum(window[1], 1.0)

    dh = line_mean(d * w, 2)
    dv = line_mean(d * w, 1)
    both_y = inside[:, step:] & inside[:, :-step]
    both_x = inside[:, :, step:] & inside[:, :, :-step]
    gy = (((dh[:, step:] - dh[:, :-step]) ** 2) * both_y).sum(axis=(1, 2)) / np.maximum(both_y.sum(axis=(1, 2)), 1)
    gx = (((dv[:, :, step:] - dv[:, :, :-step]) ** 2) * both_x).sum(axis=(1, 2)) / np.maximum(
        both_x.sum(axis=(1, 2)), 1
    )
    return (gy - gx) / np.maximum(gy + gx, 1e-12)


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Images [N, H, W, C] blurred by a Gaussian of `sigma` pixels (separable, edges repeated), as float32."""
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-(np.arange(-radius, radius + 1) ** 2) / (2 * sigma**2))
    taps /= taps.sum()
    x = np.pad(images.astype(np.float32), ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    h, w = images.shape[1:3]
    x = sum(k * x[:, i : i + h] for i, k in enumerate(taps))
    return sum(k * x[:, :, i : i + w] for i, k in enumerate(taps))


@lru_cache(maxsize=8)
def _prototypes(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean silhouette of each shape at each size class (solid renders at varied positions), crisp and blurred, and
    its shape index."""
    rng = np.random.default_rng(_PROTOTYPE_SEED)
    per_class = 16
    classes = [(s, size_class) for s in range(len(world.SHAPES)) for size_class in world.SIZES]
    scenes = [
        world.sample_scene(rng, shape=world.SHAPES[s], size=size_class, pattern="solid")
        for s, size_class in classes
        for _ in range(per_class)
    ]
    crisp = world.render_many(scenes, size)
    blurred = np.clip(np.rint(gaussian_blur(crisp, PROTOTYPE_BLUR_PX * size / 32)), 0, 255).astype(np.uint8)
    means = [_analyse(x)["silhouette"].reshape(len(classes), per_class, -1).mean(axis=1) for x in (crisp, blurred)]
    labels = np.array([s for s, _ in classes])
    return np.concatenate(means), np.concatenate([labels, labels])


def score_arrays(images: np.ndarray) -> dict[str, np.ndarray]:
    """Batched form of `score` (one batch, no chunking): attribute -> [N] indices into `world.VALUES[attribute]`,
    plus `found` [N] (False where no object stands out from the background)."""
    a = _analyse(images)
    protos, proto_labels = _prototypes(max(images.shape[1], images.shape[2]))
    sil = a["silhouette"].reshape(len(images), -1)
    d = (sil * sil).sum(1)[:, None] - 2 * sil @ protos.T + (protos * protos).sum(1)[None]
    shape = proto_labels[np.argmin(d, axis=1)]
    return {
        "found": a["found"],
        "shape": shape,
        "colour": a["colour"],
        "pattern": a["pattern"],
        "background": a["background"],
        "size": a["size"].astype(np.int64),
    }


def score(images: np.ndarray, *, chunk_pixels: int = 1 << 20) -> list[dict[str, str | None]]:
    """Read each image's attributes: a dict attribute -> value per image (uint8 [N, H, W, 3]). An image with no
    object gets None for every attribute but the background."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    out: list[dict[str, str | None]] = []
    chunk = max(1, chunk_pixels // (images.shape[1] * images.shape[2]))
    for start in range(0, len(images), chunk):
        arrays = score_arrays(images[start : start + chunk])
        for i in range(len(arrays["found"])):
            found = bool(arrays["found"][i])
            out.append(
                {
                    name: world.VALUES[name][int(arrays[name][i])] if found or name == "background" else None
                    for name in world.ATTRIBUTES
                }
            )
    return out


def matches(scored: dict[str, str | None], expected: dict[str, str]) -> bool:
    """Whether a scored image shows every expected attribute value."""
    return all(scored.get(name) == value for name, value in expected.items())
