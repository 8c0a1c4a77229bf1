"""A real multi-node Ray cluster on one machine (``ray.cluster_utils.Cluster``): a head and two workers.

``search.run --address`` joins it as any cluster. The data route under test:
the driver decodes the train and validation images once and ships them
through Ray's object store, so no worker node reads the dataset folder. The
tests prove it by deleting that folder (and the decode cache) as soon as the
driver has read it.
"""

import shutil
from pathlib import Path

import pytest

from fixtures.driver import Driver, read_board
from fixtures.studies import TINY_STUDY

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster():
    """A head with no CPUs, so every trial runs on a worker, and two one-CPU workers with their own resources."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [c.add_node(num_cpus=1, resources={f"worker_{i}": 1}) for i in range(2)]
    c.wait_for_nodes()
    yield c, workers
    c.shutdown()


def start_on(cluster, tmp_path, *, trials: int, epochs: int) -> tuple[Driver, dict]:
    study = tmp_path / "tiny.py"
    study.write_text("from search import Dataset, Study\n"
                     + TINY_STUDY.replace("NUM_SAMPLES", str(trials)).replace("MAX_EPOCHS", str(epochs)))
    # This driver's own dataset and decode cache, so the test can delete them under it.
    private = {"MEDSEARCH_DATA": str(tmp_path / "data"), "MEDSEARCH_CACHE": str(tmp_path / "cache")}
    driver = Driver(study, tmp_path / "runs", "--address", cluster.address, "--seed", "2", env=private)
    driver.wait_for("images per split")  # the driver has decoded everything it will ever read
    for folder in private.values():
        shutil.rmtree(folder)
    return driver, private


def test_trials_run_on_both_workers_with_data_from_the_object_store(cluster, tmp_path):
    c, workers = cluster
    driver, private = start_on(c, tmp_path, trials=4, epochs=2)
    assert driver.wait() == 0, driver.output

    board = read_board(tmp_path / "runs" / "tiny")
    assert len(board) == 4 and board["trial_id"].is_unique
    assert set(board["status"]) <= {"finished", "stopped"}, board[["status", "error"]]
    worker_ids = {w.node_id for w in workers}
    assert set(board["node_id"]) <= worker_ids  # the head has no CPUs: nothing ran there
    assert len(set(board["node_id"])) == 2, board["node_id"]  # both workers trained trials
    assert (board["gpu"] == "none").all() and (board["precision"] == "float32").all()  # CPU only: no mixed precision
    assert not any(Path(p).exists() for p in private.values())  # the data was gone all along


def test_a_worker_node_lost_mid_study_leaves_every_trial_accounted_for(cluster, tmp_path):
    c, workers = cluster
    driver, _ = start_on(c, tmp_path, trials=4, epochs=3)
    driver.wait_for("start    trial_", count=2)  # one trial on each worker (each has one CPU)
    c.remove_node(workers[1], allow_graceful=False)  # as a preempted spot instance: no goodbye
    assert driver.wait() == 0, driver.output

    board = read_board(tmp_path / "runs" / "tiny")
    assert len(board) == 4 and board["trial_id"].is_unique and board["trial_number"].is_unique
    assert set(board["status"]) <= {"finished", "stopped", "errored"}, board
    errored = board[board["status"] == "errored"]
    assert errored["error"].str.len().gt(0).all()  # errored only with its reason
    # The trial on the lost node failed once and was retried on the survivor (Study.max_failures = 1).
    assert board["failures"].sum() >= 1, board[["trial_name", "status", "failures", "node_id"]]
    assert "retry    trial_" in driver.output
    finished = board[board["status"] != "errored"]
    assert set(finished["node_id"]) <= {workers[0].node_id, workers[1].node_id}
    assert (board.loc[board["failures"] > 0, "node_id"] == workers[0].node_id).all()
