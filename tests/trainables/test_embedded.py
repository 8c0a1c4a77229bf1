"""The embedded synthetic dermoscopy dataset: layout, determinism, caching, signal."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from trainables.datasets.embedded import CLASSES, EMBEDDED_VERSION, META_NAME, generate_embedded

SMALL = {"n_per_class": 20, "image_size": 64}


def _files(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(root.rglob("*.png"))


def _stamps(root: pathlib.Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) per file: a rewrite via os.replace changes the inode."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _contents(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in _files(root)}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> pathlib.Path:
    """One shared small set for the read-only tests."""
    return generate_embedded(tmp_path_factory.mktemp("embedded") / "data", seed=0, **SMALL)


def test_layout_counts_and_images(small_set):
    assert isinstance(small_set, pathlib.Path)
    for name in CLASSES:
        names = sorted(p.name for p in (small_set / name).iterdir())
        assert names == [f"{name}_{i:04d}.png" for i in range(20)]
        for path in (small_set / name).iterdir():
            with Image.open(path) as image:
                assert image.format == "PNG"
                assert image.mode == "RGB"
                assert image.size == (64, 64)
    meta = json.loads((small_set / META_NAME).read_text())
    assert meta["version"] == EMBEDDED_VERSION
    assert (meta["seed"], meta["n_per_class"], meta["image_size"]) == (0, 20, 64)


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path, small_set):
    same = generate_embedded(tmp_path / "same", seed=0, **SMALL)
    other = generate_embedded(tmp_path / "other", seed=1, **SMALL)
    reference = _contents(small_set)
    assert _contents(same) == reference
    differing = [k for k, v in _contents(other).items() if v != reference[k]]
    assert len(differing) == len(reference)


def test_second_call_reuses_without_rewriting(tmp_path):
    root = generate_embedded(tmp_path / "data", seed=0, **SMALL)
    before = _stamps(root)
    assert generate_embedded(root, seed=0, **SMALL) == root
    assert _stamps(root) == before


@pytest.mark.parametrize(
    "change",
    [{"seed": 3}, {"n_per_class": 12}, {"image_size": 48}],
    ids=["seed", "n_per_class", "image_size"],
)
def test_changed_parameter_regenerates(tmp_path, change):
    root = generate_embedded(tmp_path / "data", seed=0, **SMALL)
    old = _contents(root)
    params = {"seed": 0, **SMALL, **change}
    generate_embedded(root, **params)

    meta = json.loads((root / META_NAME).read_text())
    assert {k: meta[k] for k in params} == params
    new = _contents(root)
    assert len(new) == 2 * params["n_per_class"]  # no stale files left behind
    with Image.open(next(iter(_files(root)))) as image:
        assert image.size == (params["image_size"],) * 2
    if change.keys() == {"n_per_class"}:
        # Each image depends only on (seed, class, index): the kept ones are unchanged.
        assert all(new[k] == old[k] for k in new)
    else:
        assert all(new[k] != old[k] for k in new)


def test_interrupted_generation_is_regenerated(tmp_path, small_set):
    root = generate_embedded(tmp_path / "data", seed=0, **SMALL)
    # Simulate a crash part-way: marker never written, one file torn, one missing.
    (root / META_NAME).unlink()
    (root / "benign" / "benign_0003.png").write_bytes(b"\x89PNG torn")
    (root / "malignant" / "malignant_0007.png").unlink()

    generate_embedded(root, seed=0, **SMALL)
    assert (root / META_NAME).exists()
    assert _contents(root) == _contents(small_set)


def test_missing_file_with_marker_present_is_regenerated(tmp_path, small_set):
    root = generate_embedded(tmp_path / "data", seed=0, **SMALL)
    (root / "malignant" / "malignant_0007.png").unlink()
    generate_embedded(root, seed=0, **SMALL)
    assert _contents(root) == _contents(small_set)


def test_rejects_degenerate_parameters(tmp_path):
    with pytest.raises(ValueError):
        generate_embedded(tmp_path, n_per_class=0)
    with pytest.raises(ValueError):
        generate_embedded(tmp_path, image_size=8)


def _erode(mask: np.ndarray) -> np.ndarray:
    """One step of 4-neighbour binary erosion (no scipy needed)."""
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out


def _lesion_colour_spread(path: pathlib.Path) -> float:
    """Mean per-channel std of the lesion core: the C of ABCD, measured naively.

    The lesion is whatever differs from the skin colour sampled on a ring near
    the edge; two erosions drop the blended rim and most hair, and the centre
    disc keeps vignetted corners out.
    """
    x = np.asarray(Image.open(path), dtype=np.float32)
    n = x.shape[0]
    yy, xx = np.mgrid[:n, :n]
    r = np.hypot(yy - n / 2 + 0.5, xx - n / 2 + 0.5) / (n / 2)
    skin = np.median(x[(r > 0.7) & (r < 0.9)], axis=0)
    lesion = (np.linalg.norm(x - skin, axis=-1) > 40) & (r < 0.85)
    core = _erode(_erode(lesion))
    pixels = x[core] if core.sum() > 10 else x[lesion]
    return float(pixels.std(axis=0).mean())


def test_malignant_lesions_are_more_variegated(small_set):
    # Over 20 + 20 images; identical classes would give a difference near 0
    # (standard error about 2), while the generator gives about 10-12.
    spread = {
        name: np.array([_lesion_colour_spread(p) for p in sorted((small_set / name).glob("*.png"))]) for name in CLASSES
    }
    assert spread["malignant"].mean() > spread["benign"].mean() + 5.0
    assert np.median(spread["malignant"]) > np.median(spread["benign"])
