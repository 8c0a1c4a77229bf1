"""``--storage s3://...``: results go to a bucket through pyarrow's filesystem layer.

The bucket is a real S3 endpoint on loopback (moto's server), reached by the
same AWS code path as Amazon's: pyarrow on the driver, Ray Tune's storage on
the trial workers. Nothing is mocked inside medsearch, Ray or pyarrow.
"""

import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from search.run import main

pytestmark = pytest.mark.e2e

BUCKET = "medsearch-results"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("moto's S3 server did not start")
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(10)


@pytest.fixture
def aws_env(s3_endpoint, monkeypatch):
    """Credentials and endpoint as a user on another S3-compatible store (MinIO, Ceph) would set them."""
    for key, value in {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    s3 = pafs.S3FileSystem(endpoint_override=s3_endpoint, allow_bucket_creation=True, region="us-east-1")
    s3.create_dir(BUCKET)
    return s3


def test_a_study_writes_its_leaderboard_and_checkpoints_to_a_bucket(aws_env, write_study, tmp_path, capsys):
    from fixtures.studies import TINY_STUDY

    study = write_study(TINY_STUDY.replace("NUM_SAMPLES", "2").replace("MAX_EPOCHS", "2"))
    code = main([str(study), "--storage", f"s3://{BUCKET}/runs", "--seed", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"leaderboard: s3://{BUCKET}/runs/tiny/leaderboard.parquet" in out

    from search.storage import StudyFolder

    folder = StudyFolder(f"s3://{BUCKET}/runs", "tiny")
    board = folder.read_parquet("leaderboard.parquet")
    assert len(board) == 2 and set(board["status"]) <= {"finished", "stopped"}
    for name in ("epochs.parquet", "splits.parquet", "study.json", "study_file.py", "tuner.pkl"):
        assert folder.exists(name), name
    # Every trial's checkpoint is in the bucket, written by the trial's own worker, recorded relative to the folder.
    for path in board["checkpoint_path"]:
        assert path.startswith("trial_")
        assert aws_env.get_file_info(f"{BUCKET}/runs/tiny/{path}/model.keras").size > 0
    assert not list(Path.cwd().glob("s3*")) and not list(tmp_path.glob("s3*"))  # no local folder named "s3:"


def test_a_missing_bucket_is_refused_before_ray_starts(aws_env, write_study, capsys):
    import ray

    from fixtures.studies import TINY_STUDY

    study = write_study(TINY_STUDY.replace("NUM_SAMPLES", "2").replace("MAX_EPOCHS", "2"))
    assert main([str(study), "--storage", "s3://no-such-bucket/runs"]) == 2
    err = capsys.readouterr().err
    assert "cannot write results to 's3://no-such-bucket/runs/tiny'" in err and "bucket exists" in err
    assert not ray.is_initialized()


def test_an_unknown_uri_scheme_is_refused_naming_it(write_study, capsys):
    from fixtures.studies import TINY_STUDY

    study = write_study(TINY_STUDY.replace("NUM_SAMPLES", "2").replace("MAX_EPOCHS", "2"))
    assert main([str(study), "--storage", "s4://bucket/runs"]) == 2
    err = capsys.readouterr().err
    assert "--storage 's4://bucket/runs' is not a filesystem pyarrow knows" in err and "s3://bucket/runs" in err
