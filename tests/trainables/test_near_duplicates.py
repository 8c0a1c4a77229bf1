"""The near-duplicate audit (issue 16) on generated images.

Planted copies (re-encoded, resized, flipped, brightened; cropped with the
embedding) are found, distinct images are not paired, clusters are transitive,
label conflicts are flagged (and can stop a study), the audit runs in
``prepare_data`` and prints its one line, a split grouped by near-duplicates
keeps every cluster together, and bad settings are named before Ray starts.
"""

from __future__ import annotations

import dataclasses
import argparse

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from search.prepare import prepare_data
from search.run import prepare
from search.storage import StudyFolder
from search.study import Dataset, Study, StudyError
from trainables.datasets import DatasetError, load_table
from trainables.near_duplicates import (
    PAIR_COLUMNS, SPLIT_COLUMNS, Settings, find_near_duplicates, recorded_settings, settings_from,
)

N_DISTINCT = 24


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MEDSEARCH_CACHE", str(tmp_path_factory.mktemp("cache")))  # hashes and decodes go there


def generated(seed: int, size: int = 96) -> Image.Image:
    """A distinct image per seed: a colour gradient under a dozen random ellipses and boxes, slightly blurred."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([rng.uniform(40, 200) + rng.uniform(-60, 60) * x + rng.uniform(-60, 60) * y for _ in range(3)], -1)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.uniform(-0.2, 1, 2) * size
        w, h = rng.uniform(0.1, 0.5, 2) * size
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + w, y0 + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image.filter(ImageFilter.GaussianBlur(1))


# Planted copies the hash must find: name -> (seed of the original, how the copy is made, how it is saved).
PLANTED = {
    "jpeg": (0, lambda im: im, {"quality": 60}),
    "resize": (1, lambda im: im.resize((150, 150), Image.Resampling.BICUBIC), {}),
    "flip_lr": (2, lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), {}),
    "flip_tb": (3, lambda im: im.transpose(Image.Transpose.FLIP_TOP_BOTTOM), {}),
    "brighter": (4, lambda im: ImageEnhance.Brightness(im).enhance(1.2), {}),
}


def write_dataset(root, *, copies=PLANTED, label_of_copy=None):
    """``N_DISTINCT`` distinct images over two class folders, plus the planted copies beside their originals
    (or in the folder ``label_of_copy`` names). Returns {copy name: (original path, copy path)}."""
    planted = {}
    for i in range(N_DISTINCT):
        generated(i).save(_path(root, i))
    for name, (seed, make, save) in copies.items():
        folder = (label_of_copy or {}).get(name, _label(seed))
        copy = root / folder / f"copy_{name}.{'jpg' if 'quality' in save else 'png'}"
        make(generated(seed)).save(copy, **save)
        planted[name] = (str(_path(root, seed)), str(copy))
    return planted


def _label(i: int) -> str:
    return "benign" if i % 2 == 0 else "malignant"


def _path(root, i: int):
    folder = root / _label(i)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"img_{i:02d}.png"


def _pairs(near) -> set[frozenset]:
    return {frozenset(pair) for pair in zip(near.pairs["path_a"], near.pairs["path_b"])}


HASH_ONLY = {"embedding": None}


@pytest.mark.parametrize("settings", [HASH_ONLY, True], ids=["hash", "default"])
def test_planted_copies_are_found_and_distinct_images_are_not_paired(tmp_path, settings):
    planted = write_dataset(tmp_path)
    table = load_table("folder", tmp_path)
    near = find_near_duplicates(table, settings_from(settings))
    assert _pairs(near) == {frozenset(pair) for pair in planted.values()}  # each copy, and nothing else
    assert near.pairs["found_by"].isin(["hash", "both"]).all() and near.pairs["same_label"].all()
    assert (near.pairs["hash_distance"] <= Settings().hash_distance).all()
    if settings is HASH_ONLY:
        assert (near.pairs["found_by"] == "hash").all() and near.pairs["embedding_similarity"].isna().all()
    else:  # the default also runs the embedding, which sees the re-encoded and re-lit copies as well
        assert Settings().embedding == "efficientnet_lite0" and (near.pairs["found_by"] == "both").any()
    assert list(near.pairs.columns) == PAIR_COLUMNS
    # Each copy shares a cluster with its original alone; every other image is a cluster of one.
    cluster = dict(zip(table["path"], near.clusters))
    assert all(cluster[a] == cluster[b] for a, b in planted.values())
    assert near.clusters.nunique() == len(table) - len(planted)


def test_a_tighter_threshold_finds_fewer_pairs(tmp_path):
    write_dataset(tmp_path)
    table = load_table("folder", tmp_path)
    loose = find_near_duplicates(table, settings_from(HASH_ONLY))
    exact = find_near_duplicates(table, settings_from({"hash_distance": 0, **HASH_ONLY}))
    assert (exact.pairs["hash_distance"] == 0).all() and 0 < len(exact.pairs) < len(loose.pairs)


def test_clusters_are_transitive(tmp_path):
    # A~B and B~C by embedding similarity, A and C too far apart to pair: still one cluster.
    for i in range(4):
        generated(i).save(_path(tmp_path, i))
    table = load_table("folder", tmp_path).sort_values("path", ignore_index=True)
    angle = np.radians(16)  # cos 16 deg = 0.961 between neighbours, cos 32 deg = 0.848 from A to C
    vectors = np.array([[1, 0, 0], [np.cos(angle), np.sin(angle), 0], [np.cos(2 * angle), np.sin(2 * angle), 0],
                        [0, 0, 1]])
    near = find_near_duplicates(table, Settings(), embeddings=vectors)
    paths = table["path"].tolist()
    assert _pairs(near) == {frozenset(paths[0:2]), frozenset(paths[1:3])}
    assert (near.pairs["found_by"] == "embedding").all()
    assert near.clusters[0] == near.clusters[1] == near.clusters[2] != near.clusters[3]


def test_label_conflicts_are_flagged_and_can_stop_the_study(tmp_path, capsys):
    # The flipped copy of a benign image filed under malignant.
    write_dataset(tmp_path, label_of_copy={"flip_lr": "malignant"})
    planted_seed = PLANTED["flip_lr"][0]
    assert _label(planted_seed) == "benign"
    prepared = prepare_data(_study(tmp_path))
    pairs = prepared.near_duplicates.pairs
    conflict = pairs[pairs["label_conflict"]]
    assert len(conflict) == 1 and {conflict.iloc[0]["label_a"], conflict.iloc[0]["label_b"]} == {"benign",
                                                                                                  "malignant"}
    assert "1 label conflict(s)" in prepared.near_duplicates.summary(prepared.splits)

    with pytest.raises(DatasetError, match=r"(?s)1 near-duplicate pair\(s\) have different labels:.*copy_flip_lr\.png"):
        prepare_data(_study(tmp_path, near_duplicates={"stop_on_label_conflict": True}))


def _study(root, **dataset) -> Study:
    options = {"split": "stratified", "split_options": {"val": 0.25, "test": 0.25}, **dataset}
    return Study(name="s", space=lambda trial: {"backbone": "cnn_s3"},
                 dataset=Dataset(loader="folder", path=str(root), image_size=16, **options))


def _args():
    return argparse.Namespace(data_dir=None, smoke=False, skip_corrupt=False)


def test_every_study_audits_prints_one_line_and_writes_the_pairs(tmp_path, capsys):
    data = tmp_path / "data"
    planted = write_dataset(data)
    folder = StudyFolder(tmp_path / "runs", "s")
    prepared = prepare(_study(data), _args(), folder)
    lines = [line for line in capsys.readouterr().out.splitlines() if "near-duplicates" in line]
    assert len(lines) == 1
    written = pd.read_parquet(tmp_path / "runs" / "s" / "near_duplicates.parquet")
    assert list(written.columns) == PAIR_COLUMNS + SPLIT_COLUMNS and len(written) == len(planted)
    split = dict(zip(prepared.splits["path"], prepared.splits["split"]))
    crossing = sum(split[a] != split[b] for a, b in planted.values())
    assert written["cross_split"].sum() == crossing
    assert f"{len(planted)} pair(s) in {len(planted)} cluster(s), {crossing} across splits" in lines[0]
    figures = prepared.near_duplicates.contamination(prepared.splits)
    val = prepared.splits.loc[prepared.splits["split"] == "val", "path"]
    leaked = {p for a, b in planted.values() for p, q in ((a, b), (b, a)) if split[p] == "val" and split[q] == "train"}
    assert figures["val_with_train_near_duplicate"] == len(leaked)
    assert figures["val_share_with_train_near_duplicate"] == pytest.approx(len(leaked) / len(val))


def test_the_audit_can_be_turned_off(tmp_path, capsys):
    write_dataset(tmp_path / "data")
    prepared = prepare(_study(tmp_path / "data", near_duplicates=False), _args(), StudyFolder(tmp_path / "runs", "s"))
    assert prepared.near_duplicates is None
    assert "near-duplicates" not in capsys.readouterr().out
    assert not (tmp_path / "runs" / "s" / "near_duplicates.parquet").exists()


def test_a_split_grouped_by_near_duplicates_keeps_every_cluster_together(tmp_path):
    # The folder loader has no patient ids: clusters are the only groups there are.
    planted = write_dataset(tmp_path)
    for seed in range(3):  # split after split: no seed separates a pair
        study = _study(tmp_path, split="grouped", split_options={"by": "near_duplicates", "val": 0.3, "test": 0.3},
                       seed=seed)
        prepared = prepare_data(study)
        split = dict(zip(prepared.splits["path"], prepared.splits["split"]))
        assert all(split[a] == split[b] for a, b in planted.values())
        assert prepared.near_duplicates.contamination(prepared.splits)["cross_split_pairs"] == 0
        assert set(split.values()) == {"train", "val", "test"}


@pytest.mark.parametrize("near_duplicates, message", [
    ({"hash_distance": 200}, r"dataset.near_duplicates: hash_distance: bad value 200; use a whole number of bits "
                             r"from 0 to 127"),
    ({"hash_distance": 2.5}, r"hash_distance: bad value 2.5"),
    ({"embedding_similarity": 1.5}, r"embedding_similarity: bad value 1.5; use a cosine similarity in \(0, 1\]"),
    ({"hash_dist": 10}, r"unknown option 'hash_dist'; did you mean 'hash_distance'\?"),
    ({"embedding": "cnn_s2"}, r"embedding: bad value 'cnn_s2'; backbone 'cnn_s2' has no pretrained weights"),
    ({"embedding": "efficientnet-lite0"}, r"unknown backbone 'efficientnet-lite0'; did you mean 'efficientnet_lite0'"),
    ({"stop_on_label_conflict": "yes"}, r"stop_on_label_conflict: bad value 'yes'; use True or False"),
    ("yes", r"dataset.near_duplicates: bad value 'yes'; use True .*, False .* or a dict"),
])
def test_bad_settings_are_named_when_the_study_loads(near_duplicates, message):
    with pytest.raises(StudyError, match=message):
        Study(name="s", space=lambda trial: {"backbone": "cnn_s3"}, dataset=Dataset(near_duplicates=near_duplicates))


def test_grouping_by_near_duplicates_needs_the_audit():
    with pytest.raises(StudyError, match=r"dataset.near_duplicates: bad value False; split_options by='near_dup"):
        Dataset_study(split="grouped", split_options={"by": "near_duplicates"}, near_duplicates=False)
    with pytest.raises(StudyError, match=r"dataset.split_options: split option by: unknown grouping 'lesion'"):
        Dataset_study(split="grouped", split_options={"by": ["group", "lesion"]})
    Dataset_study(split="grouped", split_options={"by": ["group", "near_duplicates"]})  # both: fine


def Dataset_study(**dataset) -> Study:  # noqa: N802 (reads as what it builds)
    return Study(name="s", space=lambda trial: {"backbone": "cnn_s3"}, dataset=Dataset(**dataset))


def test_grouping_by_lesion_on_a_loader_without_ids_is_named_before_ray(tmp_path):
    write_dataset(tmp_path)
    with pytest.raises(DatasetError, match=r"needs a group per image .* by near-duplicate clusters instead"):
        prepare_data(_study(tmp_path, split="grouped"))


def test_the_embedding_finds_a_crop_the_hash_misses(tmp_path):
    # On by default: efficientnet_lite0's pooled ImageNet features (weights ship with pip) at 128 px.
    crop = {"crop": (9, lambda im: im.crop((0, 0, 90, 90)), {})}  # 6 % off two sides
    planted = write_dataset(tmp_path, copies=crop)
    table = load_table("folder", tmp_path)
    assert find_near_duplicates(table, settings_from(HASH_ONLY)).pairs.empty  # the hash alone misses it
    near = find_near_duplicates(table)
    assert _pairs(near) == {frozenset(planted["crop"])}  # and the embedding pairs nothing else
    assert near.pairs.iloc[0]["found_by"] == "embedding"
    assert near.pairs.iloc[0]["embedding_similarity"] >= Settings().embedding_similarity


def test_the_report_shows_the_contamination_and_a_panel_of_the_closest_cross_split_pairs(tmp_path):
    from analysis.report import write_report
    from fixtures.runs import make_run_dir
    from search.prepare import write_near_duplicates, write_splits

    planted = write_dataset(tmp_path / "data")
    study = _study(tmp_path / "data")
    prepared = prepare_data(study)
    # a synthetic results folder; its dataset, split and audit replaced by ours
    run_dir = make_run_dir(tmp_path / "runs", dataset=dataclasses.asdict(study.dataset))
    folder = StudyFolder(tmp_path / "runs", run_dir.name)
    write_splits(prepared, folder)
    write_near_duplicates(prepared, folder)
    figures = prepared.near_duplicates.contamination(prepared.splits)
    assert figures["cross_split_pairs"] > 0  # the split at seed 0 leaves at least one copy apart from its original

    md_path, html_path = write_report(run_dir)
    section = md_path.read_text().split("## Near-duplicate audit")[1].split("\n## ")[0]
    assert f"**{len(planted)} pair(s)** in {len(planted)} cluster(s)" in section
    assert f"**{figures['cross_split_pairs']} across splits**" in section
    share = figures["val_share_with_train_near_duplicate"]
    assert f"of {figures['val_images']}) have a near-duplicate in train" in section and f"{100 * share:.0f}%" in section
    assert section.count("copy_") == figures["cross_split_pairs"]  # one table row per crossing pair (each has a copy)
    assert (run_dir / "report_files" / "near_duplicates.png").is_file() and "near_duplicates.png" in section
    assert "Near-duplicate audit" in html_path.read_text()


def test_the_file_records_the_settings_that_ran_and_the_report_shows_them(tmp_path):
    from analysis.report import write_report
    from fixtures.runs import make_run_dir
    from search.prepare import write_near_duplicates, write_splits

    write_dataset(tmp_path / "data")
    prepared = prepare_data(_study(tmp_path / "data", near_duplicates={"hash_distance": 20, **HASH_ONLY}))
    run_dir = make_run_dir(tmp_path / "runs")  # its study.json says near_duplicates=True (today's defaults)
    folder = StudyFolder(tmp_path / "runs", run_dir.name)
    write_splits(prepared, folder)
    write_near_duplicates(prepared, folder)
    written = pd.read_parquet(run_dir / "near_duplicates.parquet")
    assert recorded_settings(written) == Settings(hash_distance=20, embedding=None)
    section = write_report(run_dir)[0].read_text().split("## Near-duplicate audit")[1].split("\n## ")[0]
    assert "- found by: pHash within 20 of 256 bits (any flip)\n" in section  # what ran: no embedding


def test_the_report_says_when_the_audit_did_not_run(tmp_path):
    from analysis.report import write_report
    from fixtures.runs import make_run_dir

    md_path, _ = write_report(make_run_dir(tmp_path))
    assert "Not run for this study: `Dataset(near_duplicates=False)`" in md_path.read_text()


def test_an_embedding_backbone_without_weights_offline_stops_before_ray(tmp_path, monkeypatch, write_study, capsys):
    import ray

    from search.run import main

    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):  # every download fails
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty_keras_home"))  # and no file is cached
    write_dataset(tmp_path / "data")
    study = write_study(f"STUDY = Study(name='s', space=lambda trial: {{'backbone': 'cnn_s3'}}, dataset=Dataset("
                        f"loader='folder', path={str(tmp_path / 'data')!r}, image_size=16, "
                        "near_duplicates={'embedding': 'mobilenet_v2'}))\n")
    assert main([str(study), "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "ImageNet weights for backbone 'mobilenet_v2' need the file" in err and "--weights-dir" in err
    assert not ray.is_initialized()


def test_the_audit_leaves_the_gpus_to_the_trials(tmp_path, monkeypatch):
    """The driver's forward pass hides the GPUs from its own TensorFlow, so it reserves no card memory."""
    import tensorflow as tf

    hidden = []
    monkeypatch.setattr(tf.config, "set_visible_devices", lambda devices, kind=None: hidden.append((devices, kind)))
    write_dataset(tmp_path, copies={})
    find_near_duplicates(load_table("folder", tmp_path))
    assert hidden == [([], "GPU")]


# Issue 27.10: the flips and right-angle rotations a pHash does not see by itself, and a crop of 5 % a side.
TURNED = {name: (10 + i, lambda im, t=t: im.transpose(t), {}) for i, (name, t) in enumerate({
    "rotate_90": Image.Transpose.ROTATE_90, "rotate_270": Image.Transpose.ROTATE_270,
    "transpose": Image.Transpose.TRANSPOSE, "transverse": Image.Transpose.TRANSVERSE}.items())}


def test_rotated_and_transposed_copies_are_found_by_the_hash(tmp_path):
    planted = write_dataset(tmp_path, copies={**PLANTED, **TURNED})
    near = find_near_duplicates(load_table("folder", tmp_path), settings_from(HASH_ONLY))
    assert _pairs(near) == {frozenset(pair) for pair in planted.values()}  # each copy, and nothing else


@pytest.mark.parametrize("copy_first", [False, True], ids=["original first", "copy first"])
def test_a_copy_cropped_by_five_percent_a_side_is_found_by_the_hash(tmp_path, copy_first):
    # The copy is the original's middle, either way round in the table (the middle is hashed for both).
    crop = {"crop": (9, lambda im: im.crop((5, 5, 91, 91)), {"quality": 80})}
    planted = write_dataset(tmp_path, copies=crop)
    table = load_table("folder", tmp_path)
    table = table.iloc[::-1].reset_index(drop=True) if copy_first else table
    near = find_near_duplicates(table, settings_from(HASH_ONLY))
    assert _pairs(near) == {frozenset(planted["crop"])}


def test_the_audits_embedding_is_the_same_for_every_flip_and_rotation(tmp_path):
    from trainables.near_duplicates import image_embeddings

    original = generated(3)
    paths = [tmp_path / "original.png"]
    original.save(paths[0])
    for t in Image.Transpose:  # the seven flips and rotations besides the image as it is
        paths.append(tmp_path / f"{t.name}.png")
        original.transpose(t).save(paths[-1])
    as_is = image_embeddings(paths, "efficientnet_lite0", size=96)
    turned = image_embeddings(paths, "efficientnet_lite0", size=96, dihedral=True)
    assert (as_is[1:] @ as_is[0]).min() < 0.9  # one view: a rotated copy looks like another image
    assert (turned[1:] @ turned[0]).min() > 0.999  # all eight: the same features, whichever way it is turned
