"""Every cluster/*.yaml is a valid Ray cluster config, installs this project pinned, keeps Ray's
ports (dashboard and Jobs API 8265, GCS 6379, Ray Client 10001) off the internet, and runs every
node's Ray with token authentication, the token shipped from the user's machine.

Validation is Ray's own, the path `ray up` takes before it calls any cloud API:
``ray.autoscaler._private.util.prepare_config`` merges the file with the provider's defaults.yaml,
then ``validate_config`` checks the result against ``ray/autoscaler/ray-schema.json`` (jsonschema)
plus Ray's consistency checks. What needs the cloud (AMIs, instance types, quotas, IAM, subnets,
firewalls) is not checked here; cluster/README.md marks those steps.
"""

import copy
import ipaddress
import re
import shlex
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
# Ray's token: `ray get-auth-token --generate` writes it here, and Ray's token loader (after
# RAY_AUTH_TOKEN and RAY_AUTH_TOKEN_PATH, which these configs do not use) reads it from here.
TOKEN_FILE = "~/.ray/auth_token"
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


# --- token authentication -------------------------------------------------------------------

def ray_start_auth_modes(command: str) -> list:
    """The RAY_AUTH_MODE each `ray start` in the shell line ``command`` runs with (None: not set there).

    Understands ``RAY_AUTH_MODE=x ray start``, ``env RAY_AUTH_MODE=x ray start`` and an earlier
    ``export RAY_AUTH_MODE=x`` in the same line; anything subtler counts as not set.
    """
    modes, exported = [], None
    for segment in re.split(r"&&|\|\||;|\n", command):
        try:
            words = shlex.split(segment)
        except ValueError:  # a quote split by the separators above: not a command we look into
            words = segment.split()
        if words[:1] == ["export"]:
            for word in words[1:]:
                if word.startswith("RAY_AUTH_MODE="):
                    exported = word.split("=", 1)[1]
            continue
        i = 1 if words[:1] == ["env"] else 0
        env = {}
        while i < len(words) and re.fullmatch(r"[A-Za-z_]\w*=.*", words[i]):
            name, value = words[i].split("=", 1)
            env[name] = value
            i += 1
        if words[i:i + 2] == ["ray", "start"]:
            modes.append(env.get("RAY_AUTH_MODE", exported))
    return modes


def token_auth_problems(config: dict) -> list[str]:
    """Why a node of ``config`` could run Ray without the user's token; [] when none can."""
    prepared = prepare_config(copy.deepcopy(config))  # Ray's default start commands have no auth
    found = []
    for node, key in (("head", "head_start_ray_commands"), ("worker", "worker_start_ray_commands")):
        modes = [mode for command in prepared[key] for mode in ray_start_auth_modes(command)]
        if not modes:
            found.append(f"{key}: no `ray start`")
        found += [f"{key}: the {node}'s `ray start` runs with RAY_AUTH_MODE={mode}" for mode in modes
                  if mode != "token"]

    # The token reaches the nodes as a file from the user's machine, the one `ray job submit` there
    # reads too; Ray's launcher copies file_mounts to the head and the head's autoscaler to workers.
    mounts = prepared.get("file_mounts") or {}
    if mounts.get(TOKEN_FILE) != TOKEN_FILE:
        found.append(f"file_mounts does not copy {TOKEN_FILE} from the user's machine to {TOKEN_FILE}: {mounts}")

    # Never the token itself in the YAML.
    for where, value in strings(config):
        if re.search(r"\bRAY_AUTH_TOKEN\s*=", value) or re.search(r"\b[0-9a-f]{64}\b", value):
            found.append(f"{where} holds a token: {value!r}")
    return found


def container_auth_mode(config: dict) -> dict[str, str | None]:
    """RAY_AUTH_MODE in each kind of node's container environment (docker run -e), None if unset."""
    docker = config.get("docker", {})
    per_node = {"head": docker.get("run_options", []) + docker.get("head_run_options", []),
                "workers": docker.get("run_options", []) + docker.get("worker_run_options", [])}
    for name, node_type in config.get("available_node_types", {}).items():
        if name != config.get("head_node_type") and "worker_run_options" in node_type.get("docker", {}):
            per_node[name] = docker.get("run_options", []) + node_type["docker"]["worker_run_options"]
    modes = {}
    for node, options in per_node.items():
        found = [m.group(1) for o in options for m in [re.search(r"(?:-e|--env)[=\s]+RAY_AUTH_MODE=(\S+)", o)] if m]
        modes[node] = found[-1] if found else None
    return modes


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


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_node_runs_ray_with_the_users_token(path):
    """RAY_AUTH_MODE=token on the head's and the workers' `ray start`, as Ray merges them, and the
    token a file copied from the user's machine, never in the YAML."""
    assert token_auth_problems(load(path)) == []


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_commands_in_the_containers_use_the_token_too(path):
    """`ray exec`/`ray attach` commands and job drivers see RAY_AUTH_MODE=token."""
    assert set(container_auth_mode(load(path)).values()) == {"token"}


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


def _without_token_auth(path):
    """``path`` as it was before token authentication: no RAY_AUTH_MODE, nothing in file_mounts."""
    config = load(path)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        config[key] = [c.replace("RAY_AUTH_MODE=token ", "") for c in config[key]]
    config["file_mounts"] = {}
    return config


def _aws_with(change):
    config = _aws()
    change(config)
    return config


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_a_config_without_token_auth_is_caught(path):
    problems = token_auth_problems(_without_token_auth(path))
    assert any("head_start_ray_commands" in p for p in problems), problems
    assert any("worker_start_ray_commands" in p for p in problems), problems
    assert any("file_mounts" in p for p in problems), problems


@pytest.mark.parametrize("config", [
    pytest.param(_aws_with(lambda c: c.update(worker_start_ray_commands=[
        "ray stop", "ray start --address=$RAY_HEAD_IP:6379"])), id="workers-without-auth"),
    pytest.param(_aws_with(lambda c: c.pop("head_start_ray_commands")), id="rays-default-head-start"),
    pytest.param(_aws_with(lambda c: c.pop("worker_start_ray_commands")), id="rays-default-worker-start"),
    pytest.param(_aws_with(lambda c: c.update(head_start_ray_commands=[
        "ray stop", "RAY_AUTH_MODE=disabled ray start --head --dashboard-host=127.0.0.1"])), id="head-auth-disabled"),
    pytest.param(_aws_with(lambda c: c.update(worker_start_ray_commands=[
        "export RAY_AUTH_MODE=token; RAY_AUTH_MODE=disabled ray start --address=$RAY_HEAD_IP:6379"])),
        id="export-then-override"),
    pytest.param(_aws_with(lambda c: c.update(file_mounts={})), id="no-token-file"),
    pytest.param(_aws_with(lambda c: c.update(file_mounts={TOKEN_FILE: "/tmp/auth_token"})), id="another-local-file"),
    pytest.param(_aws_with(lambda c: c["setup_commands"].append(
        "mkdir -p ~/.ray && echo " + "ab12" * 16 + " > ~/.ray/auth_token")), id="token-inline-in-setup"),
    pytest.param(_aws_with(lambda c: c["head_start_ray_commands"].__setitem__(1, "RAY_AUTH_TOKEN=secret "
        + c["head_start_ray_commands"][1])), id="token-inline-in-env"),
])
def test_token_auth_gaps_are_caught(config):
    assert token_auth_problems(config)


@pytest.mark.parametrize("line, modes", [
    ("ulimit -n 65536; RAY_AUTH_MODE=token ray start --head", ["token"]),
    ("export RAY_AUTH_MODE=token && ray start --address=$RAY_HEAD_IP:6379", ["token"]),
    ("env RAY_AUTH_MODE=token ray start --head", ["token"]),
    ("ray start --head", [None]),
    ("echo RAY_AUTH_MODE=token; ray start --head", [None]),
    ("RAY_AUTH_MODE=token ray stop; ray start --head", [None]),
    ("ray stop", []),
])
def test_auth_mode_of_ray_start_is_read_from_the_shell_line(line, modes):
    assert ray_start_auth_modes(line) == modes


def test_container_env_without_auth_mode_is_caught():
    config = _aws()
    config["docker"]["run_options"] = []
    assert container_auth_mode(config)["head"] is None


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
