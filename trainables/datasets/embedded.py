"""The embedded default dataset: synthetic dermoscopy-like images, made on disk.

Real dermoscopy datasets cannot ship with the project, so the quickstart uses
images this module draws itself, deterministically from a seed, as ordinary
PNG files in a class-per-folder layout::

    root/benign/benign_0000.png ...
    root/malignant/malignant_0000.png ...
    root/EMBEDDED.json            # written last: marks a complete set

Design: the ABCD rule of dermoscopy
-----------------------------------
Dermatologists score a pigmented lesion on Asymmetry, Border irregularity,
Colour variegation and Diameter. Each image here gets a hidden *malignancy*
latent ``z``, drawn from N(-MU, 1) for benign and N(+MU, 1) for malignant;
the two distributions overlap, so some benign lesions look suspicious and
some melanomas look innocent, just as in real data. Every ABCD cue reads the
latent through its own independent noise (``z + CUE_NOISE * eps``), so no
single cue gives the label away, and combining cues helps:

- A: low-order radial harmonics (k = 1, 2, 3) bend an ellipse into an egg,
  bean or triangle; their amplitude grows with the cue.
- B: higher harmonics (k = 4..24, 1/k^1.3 spectrum) make the border ragged.
- C: benign lesions are one smooth brown; with the cue, patches of dark
  brown/black, blue-grey, red and whitish regression appear, and the base
  brown gets blotchier.
- D: malignant lesions are, weakly, larger.

Nuisances shared by both classes, so that a model must look at the lesion:
skin tone and illumination, vignetting, low-frequency skin texture, pixel
noise, random size/position/rotation/elongation of the lesion, soft or sharp
edges, and dark curved hair strokes drawn over everything.

Difficulty (scikit-learn, 5-fold stratified cross-validated balanced
accuracy, 96 px, EMBEDDED_VERSION 1; "2 x 1000, seed 0" / "2 x 400, seed 1"):

- LogisticRegression on 16x16 grayscale pixels:             0.65 / 0.60
- LogisticRegression on a 4x4x4 RGB colour histogram:       0.72 / 0.75
- hand-crafted ABCD features (skin-distance segmentation,
  colour mean/spread, blue/black/red fractions, flip
  asymmetry about the principal axes, compactness,
  solidity, area) into GradientBoosting:                    0.87 / 0.84
  ... into RandomForest (500 trees):                        0.88 / 0.85
- oracle: LogisticRegression on the generator's own four
  cue values (what the pixels can at best reveal):          0.935 / 0.915

The oracle puts the Bayes error at roughly 6-8 %; the latent alone would
allow 0.95. So a good image model should land around 0.87-0.93: clearly
above chance, clearly below 100 %, with room for hyperparameters to matter.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
from PIL import Image, ImageDraw

EMBEDDED_VERSION = 1  # bump when the generator changes, so caches invalidate

CLASSES = ("benign", "malignant")
META_NAME = "EMBEDDED.json"

# Latent means are -MU / +MU with unit spread (alone: ~5 % Bayes error).
# Every cue adds its own noise, so no single cue recovers the latent and the
# image-level Bayes error ends up around 6-8 %.
MU = 1.6
CUE_NOISE = 1.0
CUE_GAIN = 1.3  # slope of the sigmoid that maps a noisy cue to [0, 1]

_SKIN_LIGHT = np.array([236.0, 204.0, 180.0])
_SKIN_DARK = np.array([196.0, 146.0, 112.0])
_BROWN_LIGHT = np.array([170.0, 112.0, 78.0])
_BROWN_DARK = np.array([108.0, 64.0, 42.0])
# Malignant colours, in the order they tend to appear as the cue grows.
_EXTRA_COLOURS = (
    np.array([45.0, 30.0, 27.0]),  # dark brown / black
    np.array([105.0, 110.0, 126.0]),  # blue-grey veil (deep pigment)
    np.array([168.0, 82.0, 78.0]),  # red (vessels, inflammation)
    np.array([206.0, 184.0, 178.0]),  # whitish pink (regression)
)
_EXTRA_ONSET = (0.30, 0.45, 0.55, 0.80)  # cue level where each colour kicks in
_HAIR_COLOUR = np.array([38.0, 28.0, 24.0])


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------


def generate_embedded(
    root: str | os.PathLike,
    *,
    n_per_class: int = 400,
    image_size: int = 96,
    seed: int = 0,
) -> pathlib.Path:
    """Write the embedded dataset under ``root`` (or reuse it) and return ``root``.

    Reuse needs a matching ``EMBEDDED.json`` and exactly the expected PNG files.
    Anything else regenerates. Every image depends only on (seed, class, index),
    and each file is replaced atomically, so two processes that generate the
    same set into the same root at once write identical bytes and cannot leave
    a torn file.
    """
    if n_per_class < 1 or image_size < 16:
        raise ValueError("need n_per_class >= 1 and image_size >= 16")
    root = pathlib.Path(root)
    meta = {
        "version": EMBEDDED_VERSION,
        "seed": int(seed),
        "n_per_class": int(n_per_class),
        "image_size": int(image_size),
        "classes": list(CLASSES),
    }
    if _is_complete(root, meta):
        return root

    # Drop the marker first: from here until it is rewritten the set is
    # visibly incomplete, even if this process dies half-way.
    (root / META_NAME).unlink(missing_ok=True)
    for label, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        _remove_unexpected(folder, _expected_names(name, n_per_class))
        for index in range(n_per_class):
            rng = np.random.default_rng([seed, label, index])
            image = render_image(rng, label, image_size)
            _save_png(image, folder / f"{name}_{index:04d}.png")

    _write_atomic(root / META_NAME, json.dumps(meta, indent=2, sort_keys=True).encode())
    return root


def render_image(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """Draw one image (``size`` x ``size`` x 3, uint8) of class ``label`` (1 = malignant)."""
    cues = _sample_cues(rng, label)
    grid = _Grid(size)
    image = _skin(rng, grid)
    alpha, depth = _lesion_shape(rng, grid, cues)
    colour = _lesion_colour(rng, grid, cues, alpha, depth)
    image = _blend(image, colour, alpha)
    image = _hairs(rng, grid, image)
    image += rng.uniform(2.0, 6.0) * rng.standard_normal(image.shape, dtype=np.float32)  # sensor noise
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------
# the cues: one latent, read four noisy ways
# --------------------------------------------------------------------------


def _sample_cues(rng: np.random.Generator, label: int) -> dict[str, float]:
    """Per-image ABCD cue levels in [0, 1], all driven by one malignancy latent."""
    z = rng.normal(MU if label else -MU, 1.0)
    cues = {"latent": float(z)}
    for name, noise in (("asym", CUE_NOISE), ("border", CUE_NOISE), ("colour", CUE_NOISE), ("diam", 2.0)):
        u = z + noise * rng.normal()
        cues[name] = float(1.0 / (1.0 + np.exp(-CUE_GAIN * u)))
    return cues


# --------------------------------------------------------------------------
# geometry helpers
# --------------------------------------------------------------------------


class _Grid:
    """Pixel-centre coordinates in [-1, 1], so shapes do not depend on image size."""

    def __init__(self, size: int):
        self.size = size
        c = ((np.arange(size) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
        self.y, self.x = np.meshgrid(c, c, indexing="ij")
        self.pixel = 2.0 / size  # one pixel in grid units


def _blend(under: np.ndarray, over: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Alpha-blend ``over`` onto ``under`` (H x W x 3) with an H x W weight."""
    weight = weight[..., None]
    return under + (over - under) * weight


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish random field with blobs about size/cells wide."""
    coarse = rng.normal(size=(cells, cells)).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse, "F").resize((size, size), Image.BICUBIC))
    return field / (field.std() + 1e-6)


# --------------------------------------------------------------------------
# background
# --------------------------------------------------------------------------


def _skin(rng: np.random.Generator, grid: _Grid) -> np.ndarray:
    """Skin-toned background with texture, uneven light and a dark vignette."""
    tone = _SKIN_LIGHT + rng.uniform(0, 1) * (_SKIN_DARK - _SKIN_LIGHT)
    tone = tone + rng.normal(0, 6, 3)  # per-image white-balance drift
    texture = 5.0 * _smooth_field(rng, grid.size, 6)  # blotchy skin
    image = tone.astype(np.float32) + texture[..., None]

    # Dermoscopes light the centre; corners fall off, from an off-centre spot.
    cx, cy = rng.uniform(-0.2, 0.2, 2)
    r2 = ((grid.x - cx) ** 2 + (grid.y - cy) ** 2) / 2.0
    vignette = (1.0 - rng.uniform(0.15, 0.45) * r2**1.5) * rng.uniform(0.9, 1.05)  # and exposure
    return image * vignette[..., None]


# --------------------------------------------------------------------------
# the lesion: shape (A, B, D) ...
# --------------------------------------------------------------------------


def _boundary(rng: np.random.Generator, cues: dict[str, float], n: int = 360) -> np.ndarray:
    """Relative boundary radius r(theta) on n angles: an ellipse times harmonics."""
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    elong = rng.uniform(0.65, 1.0)
    tilt = rng.uniform(0, np.pi)
    ct, st = np.cos(theta - tilt), np.sin(theta - tilt)
    radius = 1.0 / np.sqrt(ct**2 + (st / elong) ** 2)
    radius /= radius.mean()

    # A: low harmonics. k=1 and k=3 break mirror symmetry; k=2 at a random
    # phase fights the ellipse's own axes.
    low = np.arange(1, 4)
    low_amp = (0.02 + 0.24 * cues["asym"]) * rng.uniform(0.3, 1.0, low.size) / np.sqrt(low)

    # B: mid/high harmonics with a 1/k**1.3 spectrum: smooth for benign,
    # ragged and notched for malignant (but not star-shaped).
    high = np.arange(4, 25)
    rough = 0.004 + 0.05 * cues["border"] ** 1.5
    high_amp = rough * rng.normal(size=high.size) * (4.0 / high) ** 1.3

    k = np.concatenate([low, high])
    amp = np.concatenate([low_amp, high_amp])
    phase = rng.uniform(0, 2 * np.pi, k.size)
    bend = amp @ np.cos(np.outer(k, theta) + phase[:, None])
    return radius * np.clip(1.0 + bend, 0.35, None)


def _lesion_shape(rng: np.random.Generator, grid: _Grid, cues: dict[str, float]):
    """Soft lesion mask alpha in [0, 1] and relative depth (0 at centre, 1 at border)."""
    size = rng.uniform(0.26, 0.42) * (0.85 + 0.35 * cues["diam"])  # D, weakly
    cx, cy = rng.uniform(-0.18, 0.18, 2)
    table = _boundary(rng, cues) * size

    dx, dy = grid.x - cx, grid.y - cy
    rho = np.hypot(dx, dy)
    theta = np.mod(np.arctan2(dy, dx), 2 * np.pi)
    angles = np.linspace(0, 2 * np.pi, table.size, endpoint=False)
    edge_r = np.interp(theta, angles, table, period=2 * np.pi).astype(np.float32)

    # Edge width at least ~1.5 px (anti-aliasing), sometimes a blurry rim.
    width = max(1.5 * grid.pixel, rng.uniform(0.01, 0.07))
    alpha = np.clip(0.5 + (edge_r - rho) / width, 0.0, 1.0)
    return alpha, np.clip(rho / edge_r, 0.0, 1.0)


# --------------------------------------------------------------------------
# ... and colour (C)
# --------------------------------------------------------------------------


def _lesion_colour(rng, grid: _Grid, cues: dict[str, float], alpha, depth) -> np.ndarray:
    """RGB of the lesion everywhere (only used where alpha > 0)."""
    c = cues["colour"]
    base = _BROWN_LIGHT + rng.uniform(0, 1) ** 0.8 * (_BROWN_DARK - _BROWN_LIGHT)
    base = (base + rng.normal(0, 5, 3)).astype(np.float32)
    # Naevi fade a little towards the rim; that alone keeps benign smooth.
    shade = 1.0 + rng.uniform(0.0, 0.15) * (depth**2 - 0.5)
    # Variegation makes the base brown blotchy.
    blotch = (3.0 + 22.0 * c) * _smooth_field(rng, grid.size, rng.integers(5, 9))
    colour = base * shade[..., None] + blotch[..., None]

    inside = alpha > 0.5
    if inside.sum() < 8:
        return colour
    for tint, onset in zip(_EXTRA_COLOURS, _EXTRA_ONSET):
        # Each extra colour switches on smoothly around its onset, with some
        # luck either way, so colour count grows with the cue but overlaps.
        if rng.uniform() > 1.0 / (1.0 + np.exp(-12.0 * (c - onset))):
            continue
        colour = _add_patch(rng, grid, colour, tint, inside, coverage=0.06 + 0.22 * c)
    return colour


def _add_patch(rng, grid, colour, tint, inside, coverage: float) -> np.ndarray:
    """Blend ``tint`` into irregular blobs covering about ``coverage`` of the lesion."""
    field = _smooth_field(rng, grid.size, rng.integers(4, 8))
    level = np.quantile(field[inside], 1.0 - coverage)
    weight = np.clip((field - level) / 0.4, 0.0, 1.0) * rng.uniform(0.45, 0.85)
    tint = (tint + rng.normal(0, 8, 3)).astype(np.float32)
    return _blend(colour, tint, weight)


# --------------------------------------------------------------------------
# hair: dark curved strokes over both classes
# --------------------------------------------------------------------------


def _hairs(rng: np.random.Generator, grid: _Grid, image: np.ndarray) -> np.ndarray:
    """Overlay 0-6 hairs: quadratic Bezier strokes, drawn at 3x and downsampled."""
    count = min(int(rng.poisson(1.6)), 6)
    if count == 0:
        return image
    scale = 3
    big = grid.size * scale
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    t = np.linspace(0.0, 1.0, 24)[:, None]
    for _ in range(count):
        p0, p2 = rng.uniform(-0.2, 1.2, (2, 2)) * big
        p1 = (p0 + p2) / 2 + rng.normal(0, 0.25, 2) * big  # bend
        points = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        width = int(rng.integers(1, 4)) * scale // 2 + 1
        draw.line([tuple(p) for p in points], fill=255, width=width, joint="curve")
    mask = np.asarray(canvas.resize((grid.size, grid.size), Image.BOX), dtype=np.float32)
    mask *= rng.uniform(0.6, 0.95) / 255.0
    hair = (_HAIR_COLOUR + rng.normal(0, 6, 3)).astype(np.float32)
    return _blend(image, hair, mask)


# --------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------


def _expected_names(name: str, n_per_class: int) -> set[str]:
    return {f"{name}_{index:04d}.png" for index in range(n_per_class)}


def _is_complete(root: pathlib.Path, meta: dict) -> bool:
    """True when the marker matches and each class folder holds exactly its files."""
    try:
        found = json.loads((root / META_NAME).read_text())
    except (OSError, ValueError):
        return False
    if found != meta:
        return False
    for name in CLASSES:
        try:
            pngs = {p.name for p in (root / name).glob("*.png")}
        except OSError:
            return False
        if pngs != _expected_names(name, meta["n_per_class"]):
            return False
    return True


def _remove_unexpected(folder: pathlib.Path, expected: set[str]) -> None:
    """Delete stale PNGs, e.g. left by an earlier, larger n_per_class.

    Expected files are left alone: they are about to be overwritten with
    identical-or-new bytes anyway, and a concurrent generator may own them.
    """
    for path in folder.iterdir():
        if path.suffix == ".png" and path.name not in expected:
            path.unlink(missing_ok=True)


def _save_png(image: np.ndarray, path: pathlib.Path) -> None:
    # No metadata and a fixed compression level, so bytes depend only on pixels.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(image, "RGB").save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, path)


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
