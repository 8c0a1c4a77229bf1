"""Decoding images of more than 8 bits: 16-bit X-ray PNGs, 32-bit integer and float images; and photographs
stored turned, with an EXIF orientation.

``decode_image`` maps the sample type's full range to 0..255 (65535 -> 255), so
intensities stay comparable across images; formats whose range it cannot know
are refused with a named error instead of being clipped to white.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fixtures.datasets import EXIF_ORIENTATION, upright_picture, write_image, write_image16, write_rotated_jpeg
from trainables.data import UnsupportedImageError, decode_image, decode_images
from trainables.datasets import DatasetError, load_table
from trainables.datasets.integrity import find_corrupt


def test_mid_grey_16bit_is_mid_grey_not_white(tmp_path):
    path = write_image16(tmp_path / "xray.png", 128 * 257)  # 32896: half of 65535
    assert Image.open(path).mode == "I;16"
    decoded = decode_image(str(path), 8)
    assert decoded.shape == (8, 8, 3) and decoded.dtype == np.uint8
    assert (decoded == 128).all(), np.unique(decoded)


def test_16bit_full_range_maps_linearly_to_8_bits(tmp_path):
    ramp = np.linspace(0, 65535, 256 * 4, dtype=np.uint16).reshape(32, 32)
    decoded = decode_image(str(write_image16(tmp_path / "ramp.png", ramp)), 32)
    assert decoded.min() == 0 and decoded.max() == 255
    assert np.array_equal(decoded[..., 0], np.round(ramp / 257).astype(np.uint8))  # no stretch, no clipping
    assert (decoded[..., 0] == decoded[..., 2]).all()  # grey -> three equal channels


def test_classes_differing_only_in_16bit_intensity_decode_apart(tmp_path):
    """Two classes of noisy X-rays, 20,000 vs 40,000 counts: after decoding they must still differ."""
    rng = np.random.default_rng(0)
    for label, level in (("dim", 20_000), ("bright", 40_000)):
        for i in range(3):
            write_image16(tmp_path / "data" / label / f"{i}.png", level + rng.integers(-500, 500, (12, 12)))
    table = load_table("folder", tmp_path / "data")
    arrays = decode_images(table["path"].tolist(), 12)  # the training path, cache included
    means = {label: arrays[(table["label"] == label).to_numpy()].mean() for label in ("dim", "bright")}
    assert means["dim"] == pytest.approx(20_000 / 257, abs=1.5)
    assert means["bright"] == pytest.approx(40_000 / 257, abs=1.5)
    assert arrays.max() < 255  # nothing clipped


def test_16bit_rgb_png_keeps_its_intensity(tmp_path):
    """Pillow opens 16-bit colour PNGs as 8-bit RGB (high byte): mid-grey stays mid-grey."""
    path = tmp_path / "rgb16.png"
    _write_png16_rgb(path, np.full((4, 4, 3), 128 * 257, dtype=np.uint16))
    assert (decode_image(str(path), 4) == 128).all()


def test_32bit_integer_and_float_images(tmp_path):
    as_int = tmp_path / "int32.tif"
    Image.fromarray(np.full((6, 6), 128 * 257, dtype=np.int32)).save(as_int)  # mode "I", 16-bit samples
    assert Image.open(as_int).mode == "I"
    assert (decode_image(str(as_int), 6) == 128).all()

    as_float = tmp_path / "float.tif"
    Image.fromarray(np.full((6, 6), 0.5, dtype=np.float32)).save(as_float)  # mode "F", 0..1
    assert Image.open(as_float).mode == "F"
    assert (decode_image(str(as_float), 6) == 128).all()


def test_images_of_unknown_range_are_refused_by_name(tmp_path):
    wide = tmp_path / "wide.tif"
    Image.fromarray(np.array([[0, 70_000]], dtype=np.int32)).save(wide)
    with pytest.raises(UnsupportedImageError, match=r"wide.tif.*mode 'I'.*0 \.\. 70000.*16-bit PNG"):
        decode_image(str(wide), 4)
    hounsfield = tmp_path / "hu.tif"
    Image.fromarray(np.array([[-1000.0, 400.0]], dtype=np.float32)).save(hounsfield)
    with pytest.raises(UnsupportedImageError, match=r"hu.tif.*mode 'F'.*-1000 \.\. 400"):
        decode_image(str(hounsfield), 4)
    assert issubclass(UnsupportedImageError, DatasetError)  # the CLIs print it as a data error

    # The start-up check agrees with the decoder, so such files are listed before Ray starts.
    ok = write_image16(tmp_path / "ok.png", 1000)
    bad = dict(find_corrupt([ok, wide, hounsfield], workers=1))
    assert set(bad) == {str(wide), str(hounsfield)}
    assert bad[str(wide)].startswith("UnsupportedImageError")


def _write_png16_rgb(path, rgb: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow cannot save one)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    h, w, _ = rgb.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb)
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)


# --- EXIF orientation (issue 27) -----------------------------------------------------------------------------------


def _resized(pixels: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR))


@pytest.mark.parametrize("orientation", [6, 8])
def test_a_photograph_stored_turned_is_decoded_upright(tmp_path, orientation):
    """A JPEG stored 128 x 64 with orientation 6 (shown 64 x 128) used to train as its stored pixels."""
    path = tmp_path / "lesion.jpg"
    shown = write_rotated_jpeg(path, upright_picture(), orientation=orientation)
    assert Image.open(path).size == (128, 64) and shown.shape == (128, 64, 3)  # stored wide, shown tall
    with Image.open(path) as stored:
        as_stored = np.asarray(stored.convert("RGB"))
    for size in (32, 64):
        decoded = decode_image(str(path), size)
        assert np.array_equal(decoded, _resized(shown, size))
        assert not np.array_equal(decoded, _resized(as_stored, size))
    assert np.array_equal(decode_images([str(path)], 32, use_cache=False)[0], _resized(shown, 32))


def test_every_reader_of_images_sees_the_displayed_orientation(tmp_path):
    from analysis.ood import _native_size
    from trainables.data import displayed_size, open_image, turned_by_exif
    from trainables.near_duplicates import image_hash

    turned = tmp_path / "turned.jpg"
    shown = write_rotated_jpeg(turned, upright_picture())
    upright = tmp_path / "upright.png"
    Image.fromarray(shown).save(upright)  # the displayed pixels, stored upright without a tag
    plain = write_image(tmp_path / "plain.png", size=8)
    with open_image(turned) as image:
        assert image.size == (64, 128) and EXIF_ORIENTATION not in image.getexif()
    assert displayed_size(turned) == _native_size(str(turned)) == (64, 128)  # the OOD check's native size
    assert displayed_size(upright) == (64, 128) and displayed_size(plain) == (8, 8)
    # the near-duplicate audit hashes what training decodes: the turned file is its upright copy (a JPEG decoded
    # at reduced scale differs by a few bits), and far from its stored pixels saved without the tag
    as_stored = tmp_path / "as_stored.png"
    with Image.open(turned) as stored:
        stored.convert("RGB").save(as_stored)

    def bits(a, b) -> int:  # the unflipped hashes' Hamming distance
        return int((image_hash(a)[0] != image_hash(b)[0]).sum())

    assert bits(turned, upright) <= 8 < 64 <= bits(as_stored, upright)
    assert find_corrupt([turned, upright, plain]) == []
    assert turned_by_exif([turned, upright, plain]) == [str(turned)]


def test_a_cache_of_unturned_pixels_written_before_is_not_reused(tmp_path, monkeypatch):
    """Decoded arrays are cached by files and size: the version in the key makes a cache of the stored
    (unturned) pixels, from before orientation was read, a different entry."""
    import trainables.data as data

    path = tmp_path / "lesion.jpg"
    shown = write_rotated_jpeg(path, upright_picture())
    with Image.open(path) as stored:
        as_stored = _resized(np.asarray(stored.convert("RGB")), 32)[None]
    with monkeypatch.context() as m:
        m.setattr(data, "_DECODER_VERSION", 2)  # the key of the cache written before the fix
        old = data.cache_dir() / f"{data.cache_key([str(path)], 32)}.npy"
    old.parent.mkdir(parents=True, exist_ok=True)
    np.save(old, as_stored)
    assert np.array_equal(decode_images([str(path)], 32)[0], _resized(shown, 32))
