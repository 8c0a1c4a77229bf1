"""DICOM images (.dcm): listed by the folder loader and ``search.predict``, decoded by ``trainables.data``.

Every file is written here with pydicom. Each expected pixel is worked out by
hand in a comment from the DICOM formulas (rescale, then the VOI LUT or the
window, onto 0..255, rounded; MONOCHROME1 inverted), never by calling the
code under test, so a wrong mapping fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, SecondaryCaptureImageStorage, generate_uid  # noqa: E402

from trainables.data import (UnreadableImageError, UnsupportedImageError, decode_image, decode_images,  # noqa: E402
                             read_dicom)
from trainables.datasets import DatasetError, load_table  # noqa: E402
from trainables.datasets._registry import IMAGE_KINDS, LeftOut, no_images_message, scan_images  # noqa: E402

COLOUR = ("RGB", "YBR_FULL")


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2",
                transfer_syntax=ExplicitVRLittleEndian, **elements) -> Path:
    """A DICOM file (Part 10, with file meta) holding ``pixels``: (rows, cols), (frames, rows, cols) with
    ``NumberOfFrames``, or (rows, cols, 3) for colour. Bit depth and sign follow the array's dtype;
    ``elements`` are set as they are (RescaleSlope=2, WindowCenter="100.5", ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    colour = photometric in COLOUR
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0  # R G B R G B ...
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    for name, value in elements.items():
        setattr(ds, name, value)
    ds.PixelData = encapsulate([b"\xff\xd8 not decoded"]) if transfer_syntax.is_compressed else pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def grey(decoded: np.ndarray) -> np.ndarray:
    """The one channel of a decoded greyscale image, after checking it is 8-bit RGB with three equal channels."""
    assert decoded.dtype == np.uint8 and decoded.ndim == 3 and decoded.shape[-1] == 3
    assert (decoded[..., 0] == decoded[..., 1]).all() and (decoded[..., 0] == decoded[..., 2]).all()
    return decoded[..., 0]


# A 16-bit unsigned X-ray: modality value x = 2 * stored - 1024 (RescaleSlope 2, RescaleIntercept -1024), stored
# = (x + 1024) / 2. Window centre 100.5, width 257, LINEAR (PS3.3 C.11.2.1.2.1): with c = 100.5 - 0.5 = 100 and
# w = 257 - 1 = 256, x <= c - w/2 = -28 is black, x > c + w/2 = 228 is white, in between
# ((x - c) / w + 0.5) * 255 = (x + 28) / 256 * 255.
WINDOW = dict(RescaleSlope=2, RescaleIntercept=-1024, WindowCenter="100.5", WindowWidth=257)
MODALITY = np.array([[-1000, -28, 0],
                     [36, 60, 164],
                     [196, 228, 1000]])
WINDOWED = np.array([[0, 0, 28],  # below the window; the lower edge; 28/256*255 = 27.89 -> 28
                     [64, 88, 191],  # 64/256*255 = 63.75 -> 64; 88/256*255 = 87.66 -> 88; 192/256*255 = 191.25 -> 191
                     [223, 255, 255]], dtype=np.uint8)  # 224/256*255 = 223.13 -> 223; the upper edge; above it


def stored_xray() -> np.ndarray:
    return ((MODALITY + 1024) // 2).astype(np.uint16)  # -1000 -> 12, -28 -> 498, 0 -> 512, ..., 1000 -> 1012


def test_16bit_monochrome2_is_rescaled_then_windowed(tmp_path):
    path = write_dicom(tmp_path / "xray.dcm", stored_xray(), **WINDOW)
    np.testing.assert_array_equal(grey(decode_image(str(path), 3)), WINDOWED)
    np.testing.assert_array_equal(grey(read_dicom(str(path))), WINDOWED)  # the full-size decoder, same pixels

    # Without the rescale the stored 512 (x = 0) would be far above the window: white, not 28.
    unscaled = write_dicom(tmp_path / "unscaled.dcm", stored_xray(), WindowCenter="100.5", WindowWidth=257)
    assert grey(decode_image(str(unscaled), 3))[0, 2] == 255


def test_monochrome1_is_inverted(tmp_path):
    path = write_dicom(tmp_path / "inverted.dcm", stored_xray(), photometric="MONOCHROME1", **WINDOW)
    expected = np.array([[255, 255, 227],  # 255 - WINDOWED, worked out: 255 - 28 = 227
                         [191, 167, 64],  # 255 - 64, 255 - 88, 255 - 191
                         [32, 0, 0]], dtype=np.uint8)  # 255 - 223
    np.testing.assert_array_equal(grey(decode_image(str(path), 3)), expected)


def test_signed_ct_window(tmp_path):
    """Signed samples, HU = stored - 1024, soft-tissue window 40/400: c = 39.5, w = 399, so black at
    HU <= -160, white above 239, and ((HU - 39.5) / 399 + 0.5) * 255 between."""
    hu = np.array([[-1024, -160, 0], [40, 100, 239], [240, 1000, -500]])
    path = write_dicom(tmp_path / "ct.dcm", (hu + 1024).astype(np.int16), RescaleSlope=1, RescaleIntercept=-1024,
                       WindowCenter=40, WindowWidth=400)
    expected = np.array([[0, 0, 102],  # air; the lower edge; (-39.5/399 + 0.5) * 255 = 102.26 -> 102
                         [128, 166, 255],  # (0.5/399 + 0.5) * 255 = 127.82 -> 128; (60.5/399 + .5) * 255 = 166.17
                         [255, 255, 0]], dtype=np.uint8)  # the upper edge; above; below
    np.testing.assert_array_equal(grey(decode_image(str(path), 3)), expected)


def test_without_window_the_modality_values_span_0_to_255(tmp_path):
    """No VOI LUT and no window: the image's own min..max of x = stored - 1024 maps onto 0..255."""
    stored = np.array([[1024, 1124], [1324, 1424]], dtype=np.uint16)  # x = 0, 100, 300, 400
    path = write_dicom(tmp_path / "plain.dcm", stored, RescaleSlope=1, RescaleIntercept=-1024)
    expected = np.array([[0, 64],  # 100/400*255 = 63.75 -> 64
                         [191, 255]], dtype=np.uint8)  # 300/400*255 = 191.25 -> 191
    np.testing.assert_array_equal(grey(decode_image(str(path), 2)), expected)

    flat = write_dicom(tmp_path / "flat.dcm", np.full((2, 2), 700, dtype=np.uint16))
    assert (decode_image(str(flat), 2) == 0).all()  # one value: no contrast, black rather than a division by zero


def test_a_voi_lut_sequence_is_applied_and_wins_over_the_window(tmp_path):
    """LUT Descriptor [4 entries, first mapped value 10, 16 bits]: x < 10 -> entry 0, x = 10..13 -> entries
    0..3, x > 13 -> entry 3; 16-bit entries span 0..65535, so 8 bits are entry * 255 / 65535."""
    stored = np.array([[5, 10, 11], [12, 13, 99], [10, 11, 12]], dtype=np.uint16)
    lut = voi_lut([4, 10, 16], [1000, 16384, 49152, 60000])
    path = write_dicom(tmp_path / "lut.dcm", stored, VOILUTSequence=[lut], WindowCenter=1000, WindowWidth=10)
    expected = np.array([[4, 4, 64],  # 1000 * 255 / 65535 = 3.89 -> 4; 16384 * 255 / 65535 = 63.75 -> 64
                         [191, 233, 233],  # 49152 * 255 / 65535 = 191.25 -> 191; 60000 * 255 / 65535 = 233.46
                         [4, 64, 191]], dtype=np.uint8)
    # The window (centre 1000) would have made every pixel black; the LUT's own 1000..60000 stretched, 0 .. 255.
    np.testing.assert_array_equal(grey(decode_image(str(path), 3)), expected)


def test_a_16bit_voi_lut_holding_12bit_entries_spans_0_to_4095(tmp_path):
    """Some CRs declare 16 bits per entry but store 12-bit values; read at 16 bits they would be near black."""
    stored = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    path = write_dicom(tmp_path / "cr.dcm", stored, VOILUTSequence=[voi_lut([4, 0, 16], [0, 1024, 3072, 4000])])
    expected = np.array([[0, 64],  # 1024 * 255 / 4095 = 63.76 -> 64
                         [191, 249]], dtype=np.uint8)  # 3072 * 255 / 4095 = 191.30; 4000 * 255 / 4095 = 249.08
    np.testing.assert_array_equal(grey(decode_image(str(path), 2)), expected)


def voi_lut(descriptor: list[int], data: list[int]) -> Dataset:
    item = Dataset()
    item.add_new("LUTDescriptor", "US", descriptor)  # both of ambiguous VR: say US, a list of 16-bit values
    item.add_new("LUTData", "US", data)
    return item


def test_multi_frame_reads_the_first_frame_and_warns_once(tmp_path, capsys):
    frames = np.stack([np.array([[0, 100], [300, 400]]), np.full((2, 2), 400), np.zeros((2, 2))]).astype(np.uint16)
    path = write_dicom(tmp_path / "cine.dcm", frames, NumberOfFrames=3)
    # the first frame, 0..400 stretched (no window): 0, 63.75 -> 64, 191.25 -> 191, 255
    np.testing.assert_array_equal(grey(decode_image(str(path), 2)), [[0, 64], [191, 255]])
    err = capsys.readouterr().err
    assert f"warning: {path}: DICOM file holds 3 frames; only the first is used" in err
    decode_image(str(path), 2)  # the start-up checks read the file again: no second warning
    assert "warning" not in capsys.readouterr().err


def test_colour_is_taken_as_is(tmp_path):
    rgb = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [12, 34, 56]]], dtype=np.uint8)
    path = write_dicom(tmp_path / "dermoscopy.dcm", rgb, photometric="RGB")
    np.testing.assert_array_equal(decode_image(str(path), 2), rgb)
    # YBR_FULL, converted to RGB by pydicom: Cb = Cr = 128 carries no colour, so R = G = B = Y.
    ybr = np.zeros((2, 2, 3), dtype=np.uint8)
    ybr[..., 0], ybr[..., 1:] = [[200, 10], [90, 255]], 128
    path = write_dicom(tmp_path / "ybr.dcm", ybr, photometric="YBR_FULL")
    np.testing.assert_array_equal(grey(decode_image(str(path), 2)), [[200, 10], [90, 255]])


def test_formats_it_cannot_map_are_refused_by_name(tmp_path):
    wide = write_dicom(tmp_path / "rgb16.dcm", np.full((2, 2, 3), 1000, dtype=np.uint16), photometric="RGB")
    with pytest.raises(UnsupportedImageError, match=r"rgb16.dcm: DICOM RGB with 16-bit samples; only 8-bit colour"):
        decode_image(str(wide), 2)
    palette = write_dicom(tmp_path / "palette.dcm", np.zeros((2, 2), dtype=np.uint8), photometric="PALETTE COLOR")
    with pytest.raises(UnsupportedImageError, match=r"palette.dcm: DICOM photometric interpretation 'PALETTE COLOR'"):
        decode_image(str(palette), 2)


def test_files_that_are_not_dicom_or_are_damaged_are_unreadable_by_name(tmp_path):
    good = write_dicom(tmp_path / "good.dcm", stored_xray(), **WINDOW)
    whole = good.read_bytes()
    jpeg = tmp_path / "photo.dcm"  # a JPEG with the wrong suffix
    Image.new("RGB", (4, 4)).save(jpeg, format="JPEG")
    cases = {
        "garbage.dcm": (b"\x00\x01 not dicom" * 40, "not a DICOM file"),
        "empty.dcm": (b"", "not a DICOM file"),
        "short_pixels.dcm": (whole[:-5], "pixel data could not be decoded"),  # the last 5 bytes of 18 missing
        "cut_header.dcm": (whole[:200], "DICOM"),  # inside the file meta
    }
    for name, (data, _) in cases.items():
        (tmp_path / name).write_bytes(data)
    cases["photo.dcm"] = (None, "not a DICOM file")
    for name, (_, reason) in cases.items():
        with pytest.raises(UnreadableImageError, match=f"{name}: .*{reason}"):
            decode_image(str(tmp_path / name), 3)
    assert issubclass(UnreadableImageError, DatasetError)  # the CLIs print it as a data error

    # The training path lists every bad file by name, as it does a corrupt JPEG, and decodes none of them.
    with pytest.raises(DatasetError, match=r"5 image\(s\) could not be decoded(.|\n)*cut_header.dcm \(Unreadable"
                                           r"ImageError(.|\n)*garbage.dcm(.|\n)*short_pixels.dcm"):
        decode_images([good, *(tmp_path / name for name in cases)], 3, use_cache=False, workers=1)


def test_compressed_pixels_without_a_decoder_name_what_to_install(tmp_path):
    from pydicom.pixels import get_decoder

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder (gdcm, pylibjpeg-libjpeg or pyjpegls) is installed here")
    path = write_dicom(tmp_path / "jpegls.dcm", np.zeros((2, 2), dtype=np.uint16), transfer_syntax=JPEGLSLossless)
    with pytest.raises(UnreadableImageError) as info:
        decode_image(str(path), 2)
    message = str(info.value)
    assert message.startswith(f"{path}: pixel data compressed as 'JPEG-LS Lossless Image Compression'")
    assert "needs a decoder that is not installed; install one of:" in message and "pylibjpeg-libjpeg" in message


def test_the_start_up_check_agrees_with_the_decoder(tmp_path):
    """``find_corrupt`` (before every study; --skip-corrupt leaves out what it lists) reads DICOM like training."""
    from trainables.datasets.integrity import find_corrupt

    good = write_dicom(tmp_path / "good.dcm", stored_xray(), **WINDOW)
    (tmp_path / "bad.dcm").write_bytes(b"no DICOM here")
    bad = dict(find_corrupt([good, tmp_path / "bad.dcm"], workers=1))
    assert list(bad) == [str(tmp_path / "bad.dcm")]
    assert bad[str(tmp_path / "bad.dcm")].startswith("UnreadableImageError: ") and "not a DICOM file" in \
        bad[str(tmp_path / "bad.dcm")]


# --- Where DICOM files are listed: the folder loader, the near-duplicate audit, search.predict ----------------------


def test_the_folder_loader_lists_and_decodes_dicom_class_folders(tmp_path):
    root = tmp_path / "xrays"
    write_dicom(root / "normal" / "a.dcm", stored_xray(), **WINDOW)
    write_dicom(root / "normal" / "sub" / "b.DCM", stored_xray(), photometric="MONOCHROME1", **WINDOW)
    write_dicom(root / "pneumonia" / "c.dcm", np.full((3, 3), 1012, dtype=np.uint16), **WINDOW)  # x = 1000: white
    Image.new("L", (3, 3), 17).save(root / "pneumonia" / "d.png")  # DICOM and PNG side by side
    (root / "pneumonia" / "report.txt").write_text("not an image")

    table = load_table("folder", root)
    names = [Path(p).relative_to(root).as_posix() for p in table["path"]]
    assert names == ["normal/a.dcm", "normal/sub/b.DCM", "pneumonia/c.dcm", "pneumonia/d.png"]
    assert table["label"].tolist() == ["normal", "normal", "pneumonia", "pneumonia"]

    arrays = decode_images(table["path"].tolist(), 3)  # the training path, cache included
    np.testing.assert_array_equal(grey(arrays[0]), WINDOWED)
    np.testing.assert_array_equal(grey(arrays[1]), 255 - WINDOWED)
    assert (arrays[2] == 255).all() and (arrays[3] == 17).all()


def test_listing_messages_name_dicom(tmp_path):
    assert IMAGE_KINDS == ".jpg/.jpeg/.png/.dcm"
    empty = tmp_path / "benign"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    listing = scan_images(empty)
    assert listing.images == [] and "file(s) that are not .jpg/.jpeg/.png/.dcm (notes.txt)" in \
        listing.left_out.describe(empty)
    left_out = LeftOut()
    left_out.update(listing.left_out)
    assert "holds no .jpg/.jpeg/.png/.dcm images" in no_images_message(empty, left_out)


def test_the_near_duplicate_hash_sees_the_decoded_pixels(tmp_path):
    """The audit hashes what training sees: a windowed DICOM hashes like a PNG of its windowed pixels."""
    from trainables.near_duplicates import image_hash

    rng = np.random.default_rng(3)
    modality = rng.integers(-400, 600, (48, 48))
    path = write_dicom(tmp_path / "xray.dcm", ((modality + 1024) // 2).astype(np.uint16), **WINDOW)
    x = 2 * ((modality + 1024) // 2) - 1024
    # the window by hand, as above: black at x <= -28, white above 228, (x + 28) / 256 * 255 between
    seen = np.where(x <= -28, 0, np.where(x > 228, 255, np.rint((x + 28) / 256 * 255))).astype(np.uint8)
    png = tmp_path / "seen.png"
    Image.fromarray(seen, "L").save(png)
    assert (image_hash(path) == image_hash(png)).all()  # (PIL itself cannot open a .dcm file at all)


def test_search_predict_classifies_a_folder_of_dicom_files(tmp_path, capsys):
    """``search.predict`` on .dcm files, through a hand-made results folder and a tiny model whose
    probabilities follow brightness: logit(malignant) - logit(benign) = 10 * mean / 255 - 5."""
    import keras

    from fixtures.runs import make_run_dir
    from analysis.predict import main

    run_dir = make_run_dir(tmp_path, [(0, "cnn_s3", "all", 1e-3, None, "finished", [0.7])])
    board = pd.read_parquet(run_dir / "leaderboard.parquet")
    board["checkpoint_path"] = "trial_000_cnn_s3/checkpoint_000001"
    board.to_parquet(run_dir / "leaderboard.parquet", index=False)
    checkpoint = run_dir / "trial_000_cnn_s3" / "checkpoint_000001"
    checkpoint.mkdir(parents=True)
    image = keras.Input((32, 32, 3))
    mean = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(image))
    head = keras.layers.Dense(2, activation="softmax")
    model = keras.Model(image, head(mean))
    head.set_weights([np.array([[0, 10 / 3]] * 3, dtype=np.float32), np.array([0, -5], dtype=np.float32)])
    model.save(checkpoint / "model.keras")
    (checkpoint / "trial.json").write_text(json.dumps({"epoch": 1, "class_names": ["benign", "malignant"]}))

    images = tmp_path / "new"
    write_dicom(images / "bright.dcm", np.full((5, 7), 1012, dtype=np.uint16), **WINDOW)  # x = 1000: all white
    write_dicom(images / "dark.dcm", np.full((5, 7), 1012, dtype=np.uint16), photometric="MONOCHROME1", **WINDOW)
    write_dicom(images / "sub" / "colour.dcm", np.tile(np.array([200, 100, 0], np.uint8), (6, 6, 1)), photometric="RGB")
    (images / "broken.dcm").write_bytes(b"no DICOM here")
    out = tmp_path / "preds.csv"

    assert main([str(run_dir), str(images), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "1 of 4 image(s)" in err and "broken.dcm (UnreadableImageError: " in err and "--skip-corrupt" in err

    assert main([str(run_dir), str(images), "--out", str(out), "--skip-corrupt"]) == 0, capsys.readouterr().err
    table = pd.read_csv(out, keep_default_na=False).set_index("file")
    assert sorted(table.index) == ["bright.dcm", "broken.dcm", "dark.dcm", "sub/colour.dcm"]
    assert "not a DICOM file" in table.loc["broken.dcm", "error"] and table.loc["broken.dcm", "predicted"] == ""
    # mean 1 -> difference 5; mean 0 -> -5; colour (200, 100, 0) -> mean 100/255 -> 10 * 100/255 - 5 = -1.0784
    malignant = {"bright.dcm": 1 / (1 + np.exp(-5)), "dark.dcm": 1 / (1 + np.exp(5)),
                 "sub/colour.dcm": 1 / (1 + np.exp(1.0784314))}
    for name, p in malignant.items():
        assert float(table.loc[name, "prob_malignant"]) == pytest.approx(p, abs=1e-5)  # the CSV rounds to 6 places
        assert table.loc[name, "predicted"] == ("malignant" if p > 0.5 else "benign")


def test_importing_the_package_does_not_import_pydicom():
    code = ("import sys, search, trainables.data, trainables.datasets\n"
            "print('pydicom' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"
