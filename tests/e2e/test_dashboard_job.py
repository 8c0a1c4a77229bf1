"""A study submitted as a Ray job through the Jobs API, checked through the dashboard's HTTP API.

This is the cluster walkthrough of cluster/README.md in miniature:
``ray job submit --working-dir . -- python -m search.run STUDY --address auto``.
"""

import json
import socket
import sys
import time
import urllib.error
import urllib.request

import pytest

from fixtures.studies import TINY_STUDY

pytestmark = pytest.mark.e2e


def get_json(url: str, headers: dict) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
        return json.loads(response.read())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def dashboard_cluster():
    """A real Ray head with its dashboard, and so the Jobs API.

    With token authentication, which Ray 2.60 turns on by default for a local
    cluster once this process has started one: set here, so the test does not
    depend on which tests ran before it.

    One node only: with a second node on this one machine, the job's unpacked
    working_dir (the driver's cwd) was deleted under the running driver, it
    seems by that node's runtime-env clean-up in the session folder they share.
    Nodes of a real cluster have disks of their own.
    """
    from ray._private.authentication.authentication_token_setup import (
        enable_token_auth_by_default,
        ensure_token_if_auth_enabled,
    )
    from ray.cluster_utils import Cluster

    assert enable_token_auth_by_default(), "RAY_AUTH_MODE is set to something other than token"
    ensure_token_if_auth_enabled()
    # Free ports, not Ray's 8265 and 52365: another Ray on this machine (a study someone is running) may hold them.
    dashboard_port, agent_port = _free_port(), _free_port()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True,
                                                      "dashboard_port": dashboard_port,
                                                      "dashboard_agent_listen_port": agent_port})
    c.wait_for_nodes()
    yield c
    c.shutdown()


def test_a_study_submitted_as_a_job_succeeds_and_logs_its_leaderboard(dashboard_cluster, tmp_path):
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled
    from ray.job_submission import JobSubmissionClient

    dashboard = f"http://{dashboard_cluster.webui_url}"
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "tiny.py").write_text("from search import Dataset, Study\n"
                                     + TINY_STUDY.replace("NUM_SAMPLES", "2").replace("MAX_EPOCHS", "2"))
    storage = tmp_path / "runs"
    client = JobSubmissionClient(dashboard)
    job = client.submit_job(
        entrypoint=f"{sys.executable} -m search.run tiny.py --address auto --storage {storage} --seed 4",
        runtime_env={"working_dir": str(job_dir)},  # what `ray job submit --working-dir .` uploads
        submission_id=f"medsearch-tiny-{int(time.time())}",
    )

    # The Jobs API runs code on the cluster: without the token it answers nothing.
    with pytest.raises(urllib.error.HTTPError, match="401"):
        get_json(f"{dashboard}/api/jobs/{job}", headers={})
    token = get_auth_headers_if_auth_enabled({})
    deadline = time.monotonic() + 300
    while (info := get_json(f"{dashboard}/api/jobs/{job}", token))["status"] in ("PENDING", "RUNNING"):
        assert time.monotonic() < deadline, info
        time.sleep(1)
    logs = get_json(f"{dashboard}/api/jobs/{job}/logs", token)["logs"]
    assert info["status"] == "SUCCEEDED", logs
    assert f"leaderboard: {storage}/tiny/leaderboard.parquet" in logs
    assert "Ray dashboard: http://" in logs  # search.run says where to watch
    assert (storage / "tiny" / "leaderboard.parquet").is_file()
