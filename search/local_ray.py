"""A local run's Ray listens on 127.0.0.1 only: nothing of it can be reached from the network.

Ray 2.60 binds its servers (GCS, raylet and object manager, every worker's gRPC
server, the dashboard agent, the runtime-env agent, the metrics exporters) to
all interfaces unless the node's IP address is loopback. And ``ray.init``
swaps a loopback ``_node_ip_address`` for the machine's network address
(``services.resolve_ip_for_localhost``) unless Ray's multi-node mode is off:
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which Ray reads once, when it is first
imported. So the switch is turned off for the moment ``ray.init`` starts Ray,
and put back afterwards.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

LOOPBACK = "127.0.0.1"


@contextlib.contextmanager
def local_ray_options(address: str | None) -> Iterator[dict]:
    """Extra ``ray.init`` arguments for ``address``: for a Ray started here, every listener on loopback.

    Where ``ray.init`` joins a cluster instead (``address``, $RAY_ADDRESS, or one
    that ``ray start`` left on this machine), whoever started that cluster chose
    its addresses: nothing is changed and nothing is added.
    """
    from ray._private import ray_constants, services

    if address is not None or services.canonicalize_bootstrap_address(None) is not None:  # ray.init's own test
        yield {}
        return
    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    old_value, old_flag = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name] = "0"  # Ray's child processes (dashboard, agents, workers) inherit it
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process read the variable when it imported Ray
    try:
        yield {"_node_ip_address": LOOPBACK, "dashboard_host": LOOPBACK}
    finally:
        # Ray is up by now and keeps its loopback address; a later run in this process may join a cluster.
        ray_constants.ENABLE_RAY_CLUSTER = old_flag
        if old_value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old_value
