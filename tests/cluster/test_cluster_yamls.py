"""Every cluster/*.yaml is a valid Ray cluster config, installs this project pinned, and keeps Ray's
unauthenticated ports (dashboard and Jobs API 8265, GCS 6379, Ray Client 10001) off the internet.

Validation is Ray's own, the path `ray up` takes before it calls any cloud API:
``ray.autoscaler._private.util.prepare_config`` merges the file with the provider's defaults.yaml,
then ``validate_config`` checks the result against ``ray/autoscaler/ray-schema.json`` (jsonschema)
plus Ray's consistency checks. What needs the cloud (AMIs, instance types, quotas, IAM, subnets,
firewalls) is not checked here; cluster/README.md marks those steps.
"""

import copy
import ipaddress
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
YAMLS = sorted((ROOT / "cluster").glob("*.yaml"))
VERSION = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
RAY_PORTS = (8265, 6379, 10001)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# Where intra-cluster CIDR rules may come from: private ranges only (a VPC's own CIDR).
INTERNAL = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def ray_validated(config: dict) -> dict:
    """``config`` as `ray up` sees it after its own offline checks; raises what `ray up` would."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# --- pinned install -------------------------------------------------------------------------

def pinned_medsearch(commands: list[str]) -> list[str]:
    """The pins in ``commands``' pip installs of medsearch: a v<version> tag, a commit, or ==<version>."""
    pins = []
    for command in commands:
        if not re.search(r"\bpip3?\s+install\b", command):
            continue
        for ref in re.findall(r"medsearch\s*@\s*git\+[^\"'\s]+@([^\"'\s#]+)", command):
            if ref == f"v{VERSION}" or re.fullmatch(r"[0-9a-f]{40}", ref):
                pins.append(ref)
        pins += [v for v in re.findall(r"\bmedsearch==([\w.]+)", command) if v == VERSION]
    return pins


def setup_per_node(prepared: dict) -> dict[str, list[str]]:
    """The set-up commands each kind of node runs, after Ray merged setup_commands into them."""
    per_node = {"head": prepared["head_setup_commands"], "workers": prepared["worker_setup_commands"]}
    for name, node_type in prepared["available_node_types"].items():
        if name != prepared["head_node_type"] and "worker_setup_commands" in node_type:
            per_node[name] = node_type["worker_setup_commands"]  # replaces the global list
    return per_node


# --- exposure of Ray's ports ----------------------------------------------------------------

def strings(node, where="config"):
    """(path, value) of every string in a parsed YAML."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from strings(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from strings(value, f"{where}[{i}]")
    elif isinstance(node, str):
        yield where, node


def internal(cidr) -> bool:
    try:
        net = ipaddress.ip_network(cidr, strict=False)
    except (TypeError, ValueError):
        return False  # a placeholder or a typo is not known to be internal
    return any(net.version == p.version and net.subnet_of(p) for p in INTERNAL)


def covers_ray_port(rule: dict) -> bool:
    if str(rule.get("IpProtocol", "")).lower() in ("-1", "all"):
        return True
    low, high = rule.get("FromPort", -1), rule.get("ToPort", -1)
    return low == -1 or any(low <= port <= high for port in RAY_PORTS)


def exposures(config: dict) -> list[str]:
    """How ``config`` could let the internet reach Ray's ports; [] when it cannot."""
    found = [f"{where} = {value!r}" for where, value in strings(config) if "0.0.0.0/0" in value or "::/0" in value]

    # AWS: a CIDR rule covering a Ray port must come from a private range; group references are fine.
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        if covers_ray_port(rule):
            sources = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
            sources += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
            sources += [r.get("PrefixListId") for r in rule.get("PrefixListIds", [])]
            ports = f"{rule.get('IpProtocol')} {rule.get('FromPort')}-{rule.get('ToPort')}"
            found += [f"security group opens {ports} to {s}" for s in sources if not internal(s)]

    # GCP: workers without an external IP, every node in the tag the firewall rules match.
    if config["provider"]["type"] == "gcp":
        for name, node_type in config["available_node_types"].items():
            node = node_type["node_config"]
            if not node.get("tags", {}).get("items"):
                found.append(f"{name}: no network tag for the firewall rules to match")
            interfaces = node.get("networkInterfaces")
            if name != config["head_node_type"] and (not interfaces or any(i.get("accessConfigs") for i in interfaces)):
                found.append(f"{name}: worker with an external IP (Ray's default when networkInterfaces is unset)")

    # The head's dashboard and Jobs API on loopback only, as merged with Ray's defaults (0.0.0.0 on clouds).
    for command in prepare_config(copy.deepcopy(config))["head_start_ray_commands"]:
        if re.search(r"\bray start\b", command) and "--head" in command:
            host = re.search(r"--dashboard-host[=\s]+(\S+)", command)
            if not host or host.group(1).strip("'\"") not in LOOPBACK:
                found.append(f"head's dashboard not bound to 127.0.0.1: {command!r}")
    return found


# --- tests ----------------------------------------------------------------------------------

def test_the_three_cluster_files_are_found():
    assert {"aws-gpu.yaml", "gcp-gpu.yaml", "onprem.yaml"} <= {p.name for p in YAMLS}


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_valid_for_rays_cluster_launcher(path):
    ray_validated(load(path))


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_node_installs_medsearch_pinned(path):
    for node, commands in setup_per_node(ray_validated(load(path))).items():
        assert pinned_medsearch(commands), (
            f"{path.name}: the {node} set-up has no pip install of medsearch pinned to v{VERSION}, "
            f"a commit or =={VERSION}")


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_image_and_pip_pin_the_ray_of_this_project(path):
    """`ray up` and `ray job submit` need the cluster's Ray to equal the local one."""
    config = load(path)
    docker = config["docker"]
    images = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    images += [t["docker"]["worker_image"] for t in config.get("available_node_types", {}).values()
               if "worker_image" in t.get("docker", {})]
    for image in images:
        assert re.fullmatch(rf"(\S+/)?rayproject/ray:{re.escape(ray.__version__)}-py3\d+-(gpu|cu\d+)", image), image
    for command in config["setup_commands"]:
        for pinned in re.findall(r"\bray(?:\[[\w,]+\])?==([\w.]+)", command):
            assert pinned == ray.__version__, command


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_rays_ports_are_not_opened_to_the_internet(path):
    assert exposures(load(path)) == []


# --- the checks can fail ----------------------------------------------------------------------

def _aws():
    return load(ROOT / "cluster" / "aws-gpu.yaml")


def _with_rule(rule):
    config = _aws()
    config["provider"]["security_group"]["IpPermissions"].append(rule)
    return config


def _with_head_start(command):
    config = _aws()
    config["head_start_ray_commands"] = ["ray stop", command]
    return config


def _without_head_start():
    config = _aws()
    del config["head_start_ray_commands"]  # Ray's defaults.yaml then binds the dashboard to 0.0.0.0
    return config


def _gcp_worker(change):
    config = load(ROOT / "cluster" / "gcp-gpu.yaml")
    change(config["available_node_types"]["gpu_worker"]["node_config"])
    return config


@pytest.mark.parametrize("config", [
    pytest.param(_with_rule({"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265,
                             "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}), id="8265-to-world"),
    pytest.param(_with_rule({"IpProtocol": "tcp", "FromPort": 6000, "ToPort": 11000,
                             "IpRanges": [{"CidrIp": "203.0.113.0/24"}]}), id="range-over-6379-public"),
    pytest.param(_with_rule({"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/1"}]}), id="all-to-half-the-internet"),
    pytest.param(_with_rule({"IpProtocol": "tcp", "FromPort": 10001, "ToPort": 10001,
                             "Ipv6Ranges": [{"CidrIpv6": "2001:db8::/32"}]}), id="10001-ipv6-public"),
    pytest.param(_with_head_start("ray start --head --dashboard-host=0.0.0.0"), id="dashboard-on-0.0.0.0"),
    pytest.param(_without_head_start(), id="rays-default-start-command"),
    pytest.param(_gcp_worker(lambda node: node.pop("networkInterfaces")), id="gcp-worker-external-ip"),
    pytest.param(_gcp_worker(lambda node: node.pop("tags")), id="gcp-worker-outside-the-firewall-tag"),
])
def test_exposures_are_caught(config):
    assert exposures(config)


def test_intra_cluster_rules_are_allowed():
    config = _with_rule({"IpProtocol": "-1", "IpRanges": [{"CidrIp": "10.0.0.0/16"}],
                         "UserIdGroupPairs": [{"GroupName": "medsearch-ray"}]})
    assert exposures(config) == []


def test_validator_rejects_a_misspelt_key():
    config = _aws()
    config["setup_comands"] = config.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="setup_comands"):
        ray_validated(config)


@pytest.mark.parametrize("line", [
    'pip install "medsearch @ git+https://github.com/org/medsearch@main"',
    'pip install "medsearch @ git+https://github.com/org/medsearch"',
    "pip install medsearch",
    "pip install -e /home/ray/medsearch",
    'echo "medsearch @ git+https://github.com/org/medsearch@v{v}"',
])
def test_unpinned_installs_are_caught(line):
    assert pinned_medsearch([line.format(v=VERSION)]) == []
