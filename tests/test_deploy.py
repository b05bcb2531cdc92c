"""Offline checks of ``deploy/``: systemd unit, container file, Prometheus rules, Grafana dashboard,
Kubernetes manifests and DERP maps.

External tools: ``promtool`` (``.ci/metrics-deps.sh``), ``systemd-analyze`` (Debian ``systemd``)
and the ``kubernetes-validate`` and ``pyyaml`` packages (``test`` extra); ``.ci/deploy-deps.sh``
installs the system tools. A missing tool skips the test that needs it, with the reason (CI runs
with ``--fail-on-skip``). Nothing here needs the network, root, a container engine or a cluster;
one test runs three relay processes on loopback with the StatefulSet's arguments and checks
that they form a TLS mesh.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from relayproc import RelayProcess, free_ports

from natlib.keys import NodePrivateKey
from relay._config import build_flagset
from relay._mesh import parse_mesh_with
from relay._metrics import build_registry
from relay._server import RelayServer
from relay._stun_server import StunStats

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "monitoring" / "prometheus" / "meshrelay-rules.yml"
RULES_TEST = DEPLOY / "monitoring" / "prometheus" / "meshrelay-rules.test.yml"
DASHBOARD = DEPLOY / "monitoring" / "grafana" / "meshrelay.json"
UNIT = DEPLOY / "systemd" / "meshrelay.service"
ENV_FILE = DEPLOY / "systemd" / "meshrelay.env"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
ENTRYPOINT = DEPLOY / "container" / "entrypoint.sh"
K8S = DEPLOY / "k8s"
HEADSCALE_MAP = DEPLOY / "headscale" / "derp.yaml"
DERPMAP_JSON = DEPLOY / "derpmap.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"

# Every metric name a query may use: meshrelay's own, and the process collector's.
METRIC_NAME = re.compile(r"(?<![\w:])((?:meshrelay|process|python)_[a-z0-9_]+)")
# Label names are not metrics: `{location="local"}` etc. never match (they are not prefixed).

TIMEOUT = 60


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion of container args."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (bash .ci/deploy-deps.sh installs it)")
    return path


def _yaml() -> Any:
    return pytest.importorskip("yaml", reason="pyyaml not installed (pip install -e '.[test]')")


def _run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def _exported_metric_names() -> set[str]:
    """Every series name an in-process relay's registry can export, including counters that have
    no series until their first increment (their family is still registered)."""
    server = RelayServer(NodePrivateKey.generate())
    names: set[str] = set()
    for family in build_registry(server, StunStats()).collect():
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type != "info":
            names.add(family.name)
    return names


def _dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def _dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel, and the template variable queries."""
    exprs: list[tuple[str, str]] = []
    for panel in _dashboard()["panels"]:
        for target in panel.get("targets", []):
            exprs.append((panel["title"], target["expr"]))
    for var in _dashboard()["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.+), *\w+\)", var["definition"])
            assert m, f"template variable {var['name']}: unexpected query {var['definition']!r}"
            exprs.append((f"variable {var['name']}", m.group(1)))
    return exprs


def _grafana_to_promql(expr: str) -> str:
    """Substitute the Grafana variables and macros the dashboard uses, so promtool can parse it."""
    out = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    out = out.replace("$job", "meshrelay").replace("$instance", ".*")
    assert "$" not in out, f"unsubstituted Grafana variable in {expr!r}"
    return out


def _rule_exprs() -> list[tuple[str, str]]:
    rules = _yaml().safe_load(RULES.read_text())
    return [
        (rule.get("alert") or rule["record"], rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]


# -- Prometheus rules ------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    promtool = _tool("promtool")
    result = _run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules() -> None:
    promtool = _tool("promtool")
    result = _run(promtool, "test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_unit_tested() -> None:
    yaml = _yaml()
    alerts = {name for name, _ in _rule_exprs() if not name.startswith("instance:")}
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    tested = {case["alertname"] for group in tests for case in group.get("alert_rule_test", [])}
    assert alerts == tested
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
                assert rule["annotations"]["summary"] and rule["annotations"]["description"]


# -- Grafana dashboard -----------------------------------------------------------------------------


def test_dashboard_structure() -> None:
    dash = _dashboard()
    assert dash["uid"] == "meshrelay-derp"
    assert dash["title"] == "meshrelay"
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert {"DS_PROMETHEUS", "job", "instance"} <= set(variables)
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"

    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert rows == ["Overview", "Connections", "Traffic", "Drops", "STUN", "TLS and HTTP", "Mesh", "Process"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat"}, panel["title"]
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            # Every selector is scoped by the dashboard's variables.
            for selector in re.findall(r"(?<![\w:])(?:meshrelay|process)_\w+(\{[^}]*\})?", target["expr"]):
                assert 'job=~"$job"' in selector and 'instance=~"$instance"' in selector, (
                    f"{panel['title']}: {target['expr']}"
                )


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Wrap every dashboard query as a recording rule and let promtool parse it."""
    promtool = _tool("promtool")
    rules = [
        {"record": f"dashboard:query_{i}", "expr": _grafana_to_promql(expr)}
        for i, (_, expr) in enumerate(_dashboard_exprs())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    result = _run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_and_rules_use_exported_metric_names() -> None:
    """Every metric the dashboard and the rules query is exported by the relay and documented."""
    exported = _exported_metric_names()
    documented = set(METRIC_NAME.findall(METRICS_DOC.read_text()))
    used: dict[str, set[str]] = {}
    for where, expr in [*_dashboard_exprs(), *_rule_exprs()]:
        for name in METRIC_NAME.findall(expr):
            used.setdefault(name, set()).add(where)
    assert used, "no metric names found: the pattern is broken"
    assert {n for n in used if n.startswith("meshrelay_")}, "no meshrelay_* names found"
    unknown = {name: sorted(where) for name, where in used.items() if name not in exported}
    assert not unknown, f"not exported by the relay's registry: {unknown}"
    undocumented = sorted(n for n in used if n.startswith("meshrelay_") and n not in documented)
    assert not undocumented, f"not in docs/metrics.md: {undocumented}"
    # The dashboard covers the areas the issue asks for.
    for name in (
        "meshrelay_current_connections",
        "meshrelay_packets_received_total",
        "meshrelay_sent_bytes_total",
        "meshrelay_packets_dropped_total",
        "meshrelay_stun_requests_total",
        "meshrelay_mesh_peers_up",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ):
        assert any(name in where for where, _ in [(e, t) for t, e in _dashboard_exprs()]), name


# -- systemd ---------------------------------------------------------------------------------------


def _unit_directives() -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    text = UNIT.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        directives.setdefault(key.strip(), []).append(value.strip())
    return directives


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` prints warnings (unknown keys, bad values) but exits 0, so any
    output is a failure. ExecStart must exist for verify: point it at a stand-in executable."""
    analyze = _tool("systemd-analyze")
    fake = tmp_path / "meshrelay"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    unit = tmp_path / "meshrelay.service"
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/meshrelay " in text
    unit.write_text(text.replace("/usr/local/bin/meshrelay", str(fake)))
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""}
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == "", result.stdout + result.stderr

    # systemd's own exposure score (0 = locked down, 10 = unprotected); fails above 2.5.
    security = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", "--threshold=25", str(unit)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        env=env,
    )
    assert security.returncode == 0, security.stdout[-2000:] + security.stderr


def test_systemd_unit_hardening() -> None:
    d = _unit_directives()
    expected = {
        "User": "meshrelay",
        "StateDirectory": "meshrelay",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "MemoryDenyWriteExecute": "yes",
        "Restart": "always",
    }
    for key, value in expected.items():
        assert d.get(key) == [value], key
    assert "@system-service" in d["SystemCallFilter"]
    assert int(d["LimitNOFILE"][0]) >= 65536
    assert d["LoadCredential"] == ["mesh.key:/etc/meshrelay/mesh.key"]
    # ProcSubset=pid hides /proc/stat, and prometheus-client's ProcessCollector then exports nothing.
    assert "ProcSubset" not in d


def test_systemd_command_line_parses() -> None:
    """ExecStart with the example env file's values substituted is a valid meshrelay command."""
    env = {"STATE_DIRECTORY": "/var/lib/meshrelay", "CREDENTIALS_DIRECTORY": "/run/credentials/x"}
    for line in ENV_FILE.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    (exec_start,) = _unit_directives()["ExecStart"]
    referenced = set(re.findall(r"\$\{?(\w+)\}?", exec_start))
    assert referenced <= set(env), f"not in {ENV_FILE.name}: {referenced - set(env)}"
    argv = shlex.split(re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], exec_start))
    assert argv[0] == "/usr/local/bin/meshrelay"
    values, given = build_flagset().parse(argv[1:])
    assert values["c"] == "/var/lib/meshrelay/derper.key"
    assert values["certmode"] == "manual"
    assert values["mesh-psk-file"] == "/run/credentials/x/mesh.key"
    assert len(parse_mesh_with(values["mesh-with"], 443)) == 3
    assert {"a", "hostname", "metrics-addr", "stun-port", "http-port"} <= given


# -- container -------------------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    text = text.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_containerfile() -> None:
    ins = _instructions(CONTAINERFILE.read_text())
    ops = [op for op, _ in ins]
    assert set(ops) <= {
        "FROM",
        "WORKDIR",
        "COPY",
        "RUN",
        "ENV",
        "USER",
        "VOLUME",
        "EXPOSE",
        "ENTRYPOINT",
        "ARG",
    }
    froms = [rest for op, rest in ins if op == "FROM"]
    assert all(f.split()[0] == "python:3.11-slim" for f in froms), froms
    # The last USER is unprivileged (numeric, so runAsNonRoot can check it).
    user = [rest for op, rest in ins if op == "USER"][-1]
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) > 0
    assert ops.index("USER") > max(i for i, op in enumerate(ops) if op == "RUN")
    exposed = {p for op, rest in ins if op == "EXPOSE" for p in rest.split()}
    assert {"443/tcp", "80/tcp", "3478/udp"} <= exposed
    assert any(op == "RUN" and "pip wheel" in rest and rest.endswith(" .") for op, rest in ins)
    assert any(op == "RUN" and "pip install" in rest for op, rest in ins)
    assert any(op == "RUN" and "ca-certificates" in rest for op, rest in ins)
    (entrypoint,) = [json.loads(rest) for op, rest in ins if op == "ENTRYPOINT"]
    assert entrypoint == ["/usr/local/bin/meshrelay-entrypoint"]
    # Every COPY source from the build context exists.
    for op, rest in ins:
        if op == "COPY" and "--from=" not in rest:
            sources = [w for w in rest.split() if not w.startswith("--")][:-1]
            for src in sources:
                assert (ROOT / src).exists(), src
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR


def test_entrypoint_maps_derp_env(tmp_path: Path) -> None:
    """The entrypoint turns the DERP_* variables into flags meshrelay's own parser accepts."""
    sh = _tool("sh")
    fake = tmp_path / "meshrelay"
    fake.write_text('#!/bin/sh\nfor a; do printf "%s\\n" "$a"; done\n')
    fake.chmod(0o755)
    env = {
        "PATH": f"{tmp_path}:/usr/bin:/bin",
        "DERP_DOMAIN": "derp1.example.com",
        "DERP_ADDR": ":8443",
        "DERP_HTTP_PORT": "-1",
        "DERP_STUN": "false",
        "DERP_STUN_PORT": "3479",
        "DERP_CERT_MODE": "manual",
        "DERP_CERT_DIR": "/etc/meshrelay/certs",
        "DERP_CONFIG": "/var/lib/meshrelay/derper.key",
        "DERP_MESH_WITH": "derp1.example.com,derp2.example.com",
        "DERP_MESH_PSK_FILE": "/etc/meshrelay/mesh.key",
        "DERP_METRICS_ADDR": ":9380",
        "DERP_VERIFY_CLIENTS": "false",
    }
    result = subprocess.run(
        [sh, str(ENTRYPOINT), "-log-level", "debug", "-home", "blank page"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    argv = result.stdout.splitlines()
    assert argv[-4:] == ["-log-level", "debug", "-home", "blank page"]
    values, _ = build_flagset().parse(argv)
    assert values["hostname"] == "derp1.example.com"
    assert values["a"] == ":8443"
    assert values["http-port"] == -1
    assert values["stun"] is False
    assert values["stun-port"] == 3479
    assert values["certdir"] == "/etc/meshrelay/certs"
    assert values["c"] == "/var/lib/meshrelay/derper.key"
    assert values["mesh-with"] == "derp1.example.com,derp2.example.com"
    assert values["mesh-psk-file"] == "/etc/meshrelay/mesh.key"
    assert values["metrics-addr"] == ":9380"
    assert values["home"] == "blank page"

    # Unset variables add no flags.
    result = subprocess.run(
        [sh, str(ENTRYPOINT)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        env={"PATH": env["PATH"]},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


# -- Kubernetes ------------------------------------------------------------------------------------


def _k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    yaml = _yaml()
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    resources = kustomization["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(resources) == on_disk, "every manifest is listed in kustomization.yaml, and only those"
    assert "namespace" not in kustomization
    docs = []
    for name in resources:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            if doc is not None:
                assert "namespace" not in doc["metadata"], f"{name}: manifests are namespace-less"
                docs.append((name, doc))
    return docs


def _by_kind(docs: list[tuple[str, dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in docs if doc["kind"] == kind]


# Resources from CRDs: kubernetes-validate has no schema for them; checked by structure below.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


@pytest.mark.parametrize("k8s_version", ["1.30.0", "latest"])
def test_k8s_manifests_validate(k8s_version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed (test extra)")
    from kubernetes_validate.utils import ValidationError

    version = kv.latest_version() if k8s_version == "latest" else k8s_version
    docs = _k8s_docs()
    validated = 0
    for name, doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        try:
            kv.validate(doc, version, True)  # strict: unknown fields are errors
        except ValidationError as e:
            path = "/".join(str(p) for p in e.path)
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} at {path}: {e.message}")
        validated += 1
    assert validated == len(docs) - 1


def test_k8s_servicemonitor_structure() -> None:
    docs = _k8s_docs()
    (monitor,) = _by_kind(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "jobLabel", "namespaceSelector"}
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in _by_kind(docs, "Service") if selector.items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in selected] == ["meshrelay"], "selects the headless Service only"
    port_names = {p["name"] for p in selected[0]["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"


def test_k8s_region_shape() -> None:
    docs = _k8s_docs()
    (sts,) = _by_kind(docs, "StatefulSet")
    services = {s["metadata"]["name"]: s for s in _by_kind(docs, "Service")}
    (pdb,) = _by_kind(docs, "PodDisruptionBudget")
    (secret,) = _by_kind(docs, "Secret")

    name = sts["metadata"]["name"]
    replicas = sts["spec"]["replicas"]
    assert replicas == 3
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    headless = services[sts["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= pod_labels.items()

    for i in range(replicas):
        svc = services[f"{name}-{i}"]
        assert svc["spec"]["type"] in {"LoadBalancer", "NodePort"}
        assert svc["spec"]["selector"] == {"statefulset.kubernetes.io/pod-name": f"{name}-{i}"}
        assert svc["spec"]["externalTrafficPolicy"] == "Local"
        ports = {(p["port"], p["protocol"]) for p in svc["spec"]["ports"]}
        assert ports == {(443, "TCP"), (80, "TCP"), (3478, "UDP")}

    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    (container,) = sts["spec"]["template"]["spec"]["containers"]
    container_ports = {p["name"]: (p["containerPort"], p["protocol"]) for p in container["ports"]}
    for svc in services.values():
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in container_ports, (svc["metadata"]["name"], port)
            assert container_ports[port["targetPort"]][1] == port["protocol"]

    # The command line, as Kubernetes expands it for pod 1 in namespace "derp".
    env = {"POD_NAME": f"{name}-1", "POD_NAMESPACE": "derp"}
    assert {e["name"] for e in container["env"]} >= set(env)
    values, _ = build_flagset().parse(_expand(container["args"], env))
    assert values["metrics-addr"] == ":9380", "metrics must listen beyond loopback in a pod"
    assert values["hostname"] == f"{name}-1.derp.example.com"
    assert values["certmode"] == "manual"
    targets = parse_mesh_with(values["mesh-with"], 443)
    assert [(t.host, t.port, t.dial_host, t.dial_port) for t in targets] == [
        (f"{name}-{i}.derp.example.com", 443, f"{name}-{i}.{headless['metadata']['name']}.derp.svc", 443)
        for i in range(replicas)
    ]

    # The mesh key and TLS files are mounted where the flags point.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    mesh_volume = next(
        n for n, v in volumes.items() if v.get("secret", {}).get("secretName") == secret["metadata"]["name"]
    )
    assert values["mesh-psk-file"] == f"{mounts[mesh_volume]}/mesh.key"
    assert re.fullmatch(r"[0-9a-f]{64}", secret["stringData"]["mesh.key"])
    assert "EXAMPLE VALUE" in (K8S / "mesh-key-secret.yaml").read_text()
    tls_volume = next(n for n, m in mounts.items() if m == values["certdir"])
    tls_paths = {item["path"] for item in volumes[tls_volume]["secret"]["items"]}
    for i in range(replicas):
        assert {f"{name}-{i}.derp.example.com.crt", f"{name}-{i}.derp.example.com.key"} <= tls_paths

    # The kubelet probes the pod IP without SNI, which a relay with a DNS -hostname refuses.
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTP", probe
        assert container[probe]["httpGet"]["path"] == "/generate_204", probe

    security = sts["spec"]["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.slow
async def test_k8s_command_line_forms_a_tls_mesh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three relay processes run the StatefulSet's arguments, as Kubernetes expands them for pods
    0..2, with only what a pod provides swapped for loopback: each pod's address (-a, and the
    dial half of every host/dialhost mesh entry), files in tmp_path, no STUN. The mesh must form
    over TLS with certificates for the public names (issued by a test CA the relays trust through
    SSL_CERT_FILE) and the relays' SNI check on: the deployed mesh configuration works."""
    docs = _k8s_docs()
    (sts,) = _by_kind(docs, "StatefulSet")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    name, replicas = sts["metadata"]["name"], sts["spec"]["replicas"]
    ports, metrics_ports = free_ports(replicas), free_ports(replicas)

    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # read by the relays' default SSL context
    psk = tmp_path / "mesh.key"
    psk.write_text(os.urandom(32).hex() + "\n")

    nodes = []
    for i in range(replicas):
        env = {"POD_NAME": f"{name}-{i}", "POD_NAMESPACE": "derp"}
        argv = _expand(container["args"], env)
        values, _ = build_flagset().parse(argv)
        certdir = tmp_path / f"certs{i}"
        certdir.mkdir()
        cert = ca.issue_cert(values["hostname"])
        (certdir / f"{values['hostname']}.crt").write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(certdir / f"{values['hostname']}.key"))
        targets = parse_mesh_with(values["mesh-with"], 443)
        mesh_with = ",".join(f"{t.host}:{ports[j]}/127.0.0.1:{ports[j]}" for j, t in enumerate(targets))
        # Go flag syntax: the last occurrence of a flag wins.
        overrides = [
            f"-a=127.0.0.1:{ports[i]}",
            "-http-port=-1",
            "-stun=false",
            f"-c={tmp_path / f'node{i}.key'}",
            f"-certdir={certdir}",
            f"-mesh-psk-file={psk}",
            f"-mesh-with={mesh_with}",
            f"-metrics-addr=127.0.0.1:{metrics_ports[i]}",
        ]
        nodes.append(RelayProcess([*argv, *overrides]))

    def peers_up(port: int) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith("meshrelay_mesh_peers_up "):
                    return float(line.split()[1])
        raise AssertionError("meshrelay_mesh_peers_up not exported")

    try:
        for node in nodes:
            node.start()
        for node in nodes:
            await node.wait_for("mesh: connected to", count=replicas - 1, timeout=30)
            await node.wait_for("is this relay itself", timeout=30)
        for port in metrics_ports:
            assert await trio.to_thread.run_sync(peers_up, port) == replicas - 1
    finally:
        codes = [node.stop() for node in nodes]
        for i, node in enumerate(nodes):
            sys.stderr.write(f"--- node {i} log ---\n" + "".join(node.lines))
    assert codes == [0] * replicas
    for i, node in enumerate(nodes):
        assert not [line for line in node.lines if "Traceback" in line or " ERROR " in line], f"node {i}"


# -- DERP maps -------------------------------------------------------------------------------------

HEADSCALE_NODE_KEYS = {
    "name",
    "regionid",
    "hostname",
    "ipv4",
    "ipv6",
    "stunport",
    "stunonly",
    "derpport",
    "canport80",
}
GO_NAMES = {
    "regionid": "RegionID",
    "regioncode": "RegionCode",
    "regionname": "RegionName",
    "nodes": "Nodes",
    "name": "Name",
    "hostname": "HostName",
    "ipv4": "IPv4",
    "ipv6": "IPv6",
    "stunport": "STUNPort",
    "stunonly": "STUNOnly",
    "derpport": "DERPPort",
    "canport80": "CanPort80",
}


def test_headscale_derp_map() -> None:
    data = _yaml().safe_load(HEADSCALE_MAP.read_text())
    assert list(data) == ["regions"]
    assert list(data["regions"]) == [900]
    region = data["regions"][900]
    assert set(region) == {"regionid", "regioncode", "regionname", "nodes"}
    assert region["regionid"] == 900
    nodes = region["nodes"]
    assert len(nodes) == 3
    assert len({n["name"] for n in nodes}) == 3
    assert len({n["hostname"] for n in nodes}) == 3
    assert len({n["ipv4"] for n in nodes}) == 3, "DERP nodes must not share an address"
    for node in nodes:
        assert set(node) <= HEADSCALE_NODE_KEYS, "headscale's yaml.v3 needs lower-case Go field names"
        assert node["regionid"] == 900
        assert isinstance(node["name"], str)
        assert ipaddress.ip_address(node["ipv4"]).version == 4
        assert ipaddress.ip_address(node["ipv6"]).version == 6
        assert node["stunport"] == 3478 and node["derpport"] == 443 and node["stunonly"] is False


def test_derpmap_json_matches_headscale_map() -> None:
    yaml_map = _yaml().safe_load(HEADSCALE_MAP.read_text())

    def go(d: Any) -> Any:
        if isinstance(d, dict):
            return {GO_NAMES[k]: go(v) for k, v in d.items()}
        if isinstance(d, list):
            return [go(x) for x in d]
        return d

    data = json.loads(DERPMAP_JSON.read_text())
    assert data["Regions"] == {str(k): go(v) for k, v in yaml_map["regions"].items()}
    assert set(data) <= {"Regions", "omitDefaultRegions", "HomeParams"}
    for region_id in data["Regions"]:
        assert 900 <= int(region_id) <= 999, "self-hosted regions use IDs 900-999"
