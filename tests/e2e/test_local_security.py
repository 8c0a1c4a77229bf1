"""A local run's Ray listens on loopback only, so nothing of it is reachable from the network;
a run that joins a cluster (--address, $RAY_ADDRESS) is left as it was.
"""

import ipaddress
import os
import re
import signal

import pytest

from fixtures.driver import Driver, listening_sockets
from fixtures.studies import TINY_STUDY
from search.local_ray import LOOPBACK, local_ray_options


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, an IPv6 socket bound to IPv4 loopback
    return (mapped or address).is_loopback


@pytest.mark.e2e
def test_every_listener_of_a_local_run_is_on_loopback(tmp_path):
    study = tmp_path / "tiny.py"
    study.write_text("from search import Dataset, Study\n"
                     + TINY_STUDY.replace("NUM_SAMPLES", "2").replace("MAX_EPOCHS", "4"))
    run = Driver(study, tmp_path / "runs", "--seed", "1")
    try:
        run.wait_for("] start ", timeout=240)  # a trial is running: Ray and a worker are all up
        sockets = listening_sockets(run.pid)
        os.kill(run.pid, signal.SIGINT)
        run.wait(timeout=120)
    finally:
        try:
            os.killpg(run.pid, signal.SIGKILL)  # whatever of Ray outlived the driver
        except ProcessLookupError:
            pass
    listing = "\n".join(f"{pid:>7} {label:<24} {ip}:{port}" for pid, label, ip, port in sockets)

    # The listing holds Ray itself, the driver and a trial's worker, so a measurement that missed them cannot pass.
    labels = {label for _, label, _, _ in sockets}
    assert {"search.run", "gcs_server", "raylet"} <= labels, listing
    assert any(label.startswith("ray::ImplicitFunc") for label in labels), listing
    dashboard_port = int(re.search(r"Ray dashboard: http://[^\s:]+:(\d+)", run.output).group(1))
    assert dashboard_port in {port for *_, port in sockets}, listing  # the dashboard stays reachable locally

    exposed = [line for line, (_, _, ip, _) in zip(listing.splitlines(), sockets) if not is_loopback(ip)]
    assert not exposed, "listening beyond loopback:\n" + "\n".join(exposed)


def multi_node_switch():
    from ray._private import ray_constants

    return ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)


def test_a_local_ray_gets_loopback_only_while_it_starts():
    before = multi_node_switch()
    with pytest.raises(RuntimeError, match="ray.init failed"):
        with local_ray_options(None) as options:
            assert options == {"_node_ip_address": LOOPBACK, "dashboard_host": LOOPBACK}
            assert multi_node_switch() == (False, "0")  # what makes Ray keep a loopback node address
            raise RuntimeError("ray.init failed")
    assert multi_node_switch() == before  # put back, even when Ray failed to start


@pytest.mark.parametrize("address, ray_address", [("auto", None), ("ray://head:10001", None), (None, "10.0.0.5:6379")])
def test_a_run_that_joins_a_cluster_is_left_as_it_was(monkeypatch, address, ray_address):
    if ray_address:
        monkeypatch.setenv("RAY_ADDRESS", ray_address)  # ray.init(address=None) joins this cluster
    before = multi_node_switch()
    with local_ray_options(address) as options:
        assert options == {} and multi_node_switch() == before
