"""Static checks of the deployment artifacts: Dockerfile, docker-compose, Kubernetes, ECS,
Prometheus rules and the Grafana dashboard.

No network, Docker engine or cluster is needed. Schemas come from PyPI packages that ship
them offline: kubernetes-validate (Kubernetes API), check-jsonschema (the compose spec) and
botocore (the ECS and Application Auto Scaling APIs). PromQL is parsed by promql-parser, a
port of Prometheus' own parser. Bridge configs go through bridge.config, like
`mqtt-bridge check`.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import botocore.session
import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import trustme
import yaml
from botocore.validate import ParamValidator

from bridge import __version__
from bridge.config import BridgeConfig, cross_check, load_config
from bridge.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
ECS = DEPLOY / "ecs"
OVERLAYS = ("dtb", "btd")
WORKERS = ("dtb-0", "dtb-1", "btd-0")  # compose services
K8S_VERSIONS = ("1.29.0", "1.33.0")  # the oldest we support and a recent one
ETC = "/etc/mqtt-bridge"  # where config, tls/ and secrets/ live in every deployment
GRACE_SECONDS = 30  # Kubernetes' default grace period; shutdown.deadline must stay below

# What the bridge exports (README "HTTP endpoints and metrics", plus issue 5's additions).
_COUNTERS = {
    "disconnects_total",
    "received_total",
    "published_total",
    "acknowledged_total",
    "dropped_total",
    "dead_lettered_total",
    "abandoned_total",
    "reconnects_total",
    "throttled_total",
    "archive_batches_total",
    "archive_bytes_total",
    "archive_records_total",
    "archive_failures_total",
    "archive_dropped_total",
    "skipped_total",  # issue 11: copy routes and cohorts
    "reloads_total",
    # path health and failover (issue 12)
    "heartbeats_total",
    "failovers_total",
    "failback_probes_total",
    "connection_received_total",
    "protocol_errors_total",
}
_GAUGES = {
    "inflight_messages",
    "inflight_bytes",
    "inflight_messages_limit",
    "inflight_oldest_age_seconds",
    "route_inflight_messages",
    "route_last_published_timestamp_seconds",
    "ready",
    "connected",
    "build_info",
    "archive_lag_seconds",
    "cohort_percent",
    "heartbeat_age_seconds",
    "heartbeat_stale_after_seconds",
    "endpoint_active",
}
_HISTOGRAMS = {"e2e_latency_seconds", "heartbeat_latency_seconds"}
METRICS = frozenset(
    {f"mqtt_bridge_{name}" for name in _COUNTERS | _GAUGES}
    | {f"mqtt_bridge_{h}_{s}" for h in _HISTOGRAMS for s in ("bucket", "sum", "count")}
    # Prometheus' own series about a scrape (a worker that is down has only these).
    | {"up"}
)

# Config keys the artifacts may use before bridge.config knows them. While one is reported
# as an "unknown key" it is set aside and the rest is validated. Once it is implemented, it
# is validated like any other key.
PENDING_KEYS = frozenset({"backup"})


# --- helpers ------------------------------------------------------------------------------


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _yaml_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _seconds(duration: str | int | float) -> float:
    """Compose/Prometheus durations: 30s, 1m30s, 10m, 500ms, or a plain number of seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", duration)
    assert parts, f"not a duration: {duration!r}"
    assert "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def _localize(node: Any, etc: str, dest: Path, files: dict[str, str]) -> Any:
    """Point paths under ``etc`` into ``dest``, creating the files (PEMs, password) there."""
    if isinstance(node, dict):
        return {k: _localize(v, etc, dest, files) for k, v in node.items()}
    if isinstance(node, list):
        return [_localize(v, etc, dest, files) for v in node]
    if isinstance(node, str) and node.startswith(etc + "/"):
        target = dest / node.removeprefix(etc + "/")
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(files[target.name])
        return str(target)
    return node


def _bridge_config(raw: dict[str, Any], path: Path) -> BridgeConfig:
    """Validate like `mqtt-bridge check`, setting aside keys still pending (see above)."""
    path.write_text(yaml.safe_dump(raw))
    try:
        return load_config(path)
    except ConfigError as exc:
        unknown = {p.removesuffix(": unknown key") for p in exc.problems if "unknown key" in p}
        pending = unknown & PENDING_KEYS
        others = [p for p in exc.problems if p.removesuffix(": unknown key") not in pending]
        if others or not pending:
            pytest.fail(f"{path.name}: " + "; ".join(exc.problems))
    stripped = copy.deepcopy(raw)
    for key in pending:
        section, _, name = key.rpartition(".")
        (stripped[section] if section else stripped).pop(name)
    path.write_text(yaml.safe_dump(stripped))
    try:
        return load_config(path)
    except ConfigError as exc:
        pytest.fail(f"{path.name} (without {sorted(pending)}): " + "; ".join(exc.problems))


def _promql_metrics(expr: str) -> set[str]:
    """Metric names an expression reads; raises ValueError if it does not parse."""
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name or "<no name>")

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def _output_labels(expr: Any) -> set[str] | None:
    """Labels an alert expression keeps, when an aggregation decides them (else None)."""
    if isinstance(expr, promql_parser.BinaryExpr) and isinstance(
        expr.rhs, promql_parser.NumberLiteral
    ):
        expr = expr.lhs
    if (
        isinstance(expr, promql_parser.AggregateExpr)
        and expr.modifier is not None
        and expr.modifier.type == promql_parser.AggModifierType.By
    ):
        return set(expr.modifier.labels)
    return None


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.upper().startswith("BRIDGE_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture(scope="module")
def secret_files() -> dict[str, str]:
    """Contents for the files a config names: real PEMs, so TLS settings load."""
    ca = trustme.CA()
    cert = ca.issue_cert("mqtt-bridge")
    return {
        "ca.pem": ca.cert_pem.bytes().decode(),
        "cert.pem": cert.cert_chain_pems[0].bytes().decode(),
        "key.pem": cert.private_key_pem.bytes().decode(),
        "password": "not-a-real-password\n",
    }


# --- every shipped configuration -------------------------------------------------------------


def _shipped_configs() -> list[Path]:
    """Every bridge configuration in deploy/ (a YAML mapping with a `direction`)."""
    found = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        docs = _yaml_all(path)
        if len(docs) == 1 and isinstance(docs[0], dict) and "direction" in docs[0]:
            found.append(path)
    return found


def test_every_shipped_config_passes_check_with_its_sizing_rules(
    tmp_path: Path,
    clean_env: pytest.MonkeyPatch,
    secret_files: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`mqtt-bridge check --strict`: valid, no loops, and no sizing warning (a shipped
    config that breaks the README's own sizing rules is a bug)."""
    from bridge.cli import main

    shipped = _shipped_configs()
    names = {p.relative_to(DEPLOY).as_posix() for p in shipped}
    assert {
        "compose/dtb-0.yaml", "compose/dtb-1.yaml", "compose/btd-0.yaml",
        "kubernetes/overlays/dtb/config.yaml", "kubernetes/overlays/btd/config.yaml",
        "examples/dtb-aws-iot.yaml", "examples/btd-aws-iot.yaml",
    } == names  # fmt: skip
    files = {
        **secret_files,
        "AmazonRootCA1.pem": secret_files["ca.pem"],
        "certificate.pem.crt": secret_files["cert.pem"],
        "private.pem.key": secret_files["key.pem"],
    }
    clean_env.setenv("HOSTNAME", "worker-0")  # instance_id where the config leaves it out
    for path in shipped:
        text = path.read_text().replace("<ENDPOINT>", "abc123").replace("<REGION>", "eu-west-1")
        raw = _localize(yaml.safe_load(text), ETC, tmp_path / "etc", files)
        copy = tmp_path / path.relative_to(DEPLOY).as_posix().replace("/", "-")
        copy.write_text(yaml.safe_dump(raw))
        code = main(["check", "--strict", "-q", "--config", str(copy)])
        err = capsys.readouterr().err
        assert (code, err) == (0, ""), f"{path.relative_to(DEPLOY)}: {err}"


# --- Dockerfile ---------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        keyword, _, args = (pending + text).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in _dockerfile():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, args))
    return stages


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _docker_ignored(rel: str) -> bool:
    """.dockerignore semantics: the last matching pattern wins; a match on a parent counts."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.strip().startswith("#")]
    parts = rel.split("/")
    paths = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _glob_regex(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(p) for p in paths):
            ignored = not negate
    return ignored


def test_dockerfile_runtime_stage() -> None:
    instructions = _dockerfile()
    global_args = {
        name: default
        for keyword, args in instructions[: [k for k, _ in instructions].index("FROM")]
        if keyword == "ARG"
        for name, _, default in [args.partition("=")]
    }
    stages = _stages()
    assert len(stages) >= 2, "multi-stage: build the wheel apart from the runtime"
    runtime = stages[-1]
    base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m[1]], runtime[0][1].split()[0])
    # Pinned by digest (refreshed with `docker buildx imagetools inspect`, see README).
    assert re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", base), base
    assert all(args.split()[0] == runtime[0][1].split()[0] for args in
               [stage[0][1] for stage in stages])  # fmt: skip

    def last(keyword: str) -> str:
        values = [args for k, args in runtime if k == keyword]
        assert values, f"no {keyword} in the runtime stage"
        return values[-1]

    user = last("USER").split(":")
    assert all(part.isdigit() for part in user), "numeric USER, so runAsNonRoot can check it"
    assert int(user[0]) != 0
    healthcheck = last("HEALTHCHECK")
    options, _, command = healthcheck.partition("CMD ")
    assert json.loads(command) == ["mqtt-bridge", "health"]
    assert "--interval=" in options
    assert json.loads(last("ENTRYPOINT")) == ["mqtt-bridge"]
    assert json.loads(last("CMD")) == ["run", "--config", f"{ETC}/config.yaml"]
    env = " ".join(args for k, args in runtime if k == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    # The image's listen address is a default a config file can override (even with
    # null), never a BRIDGE_ variable, which would override the file.
    assert "MQTT_BRIDGE_DEFAULT_LISTEN=0.0.0.0:9100" in env
    assert "BRIDGE_HTTP__LISTEN" not in env
    assert last("EXPOSE") == "9100"
    # The runtime installs our wheel from the builder, no sources and no build tools.
    assert not [args for k, args in runtime if k in ("COPY", "ADD") and "--from" not in args]
    assert any("--mount=type=bind,from=builder" in args for k, args in runtime if k == "RUN")
    # Dependencies come from the hashed lock file, in both stages.
    for stage in stages:
        runs = " ".join(args for k, args in stage if k == "RUN")
        assert "--require-hashes" in runs
        assert "requirements.lock" in runs


def test_lock_file_pins_every_dependency_with_hashes() -> None:
    """requirements.lock (scripts/lock.sh): every pin has hashes, and every runtime
    dependency of pyproject.toml is pinned."""
    text = (ROOT / "requirements.lock").read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 1)[1].strip())
    pinned = {}
    for entry in entries:
        name, _, rest = entry.partition("==")
        assert rest, f"not pinned with ==: {entry[:60]}"
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", rest)
        assert hashes, f"{name}: no sha256 hash"
        pinned[re.sub(r"[-_.]+", "-", name.lower())] = hashes
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for requirement in pyproject["project"]["dependencies"]:
        name = re.split(r"[\[<>=;! ]", requirement, maxsplit=1)[0]
        assert re.sub(r"[-_.]+", "-", name.lower()) in pinned, f"{name} is not in the lock"


def test_docker_build_context_has_what_the_wheel_needs() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied: list[str] = []
    for keyword, args in _stages()[0]:
        if keyword in ("COPY", "ADD"):
            words = [w for w in args.split() if not w.startswith("--")]
            copied += words[:-1]
    needed = [pyproject["project"]["readme"], "pyproject.toml"]
    needed += pyproject["tool"]["setuptools"]["packages"]
    assert set(needed) <= {c.rstrip("/") for c in copied}, "the wheel build needs these"
    for source in copied:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: not in the repository"
        files = [path] if path.is_file() else list(path.rglob("*.py"))
        assert files, source
        for file in files:
            rel = file.relative_to(ROOT).as_posix()
            assert not _docker_ignored(rel), f".dockerignore drops {rel}, which COPY needs"
    for rel in ("tests/test_deploy.py", ".venv/pyvenv.cfg", "bridge/__pycache__/x.pyc"):
        assert _docker_ignored(rel), f"{rel} should stay out of the build context"


# --- docker-compose -----------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    doc = _yaml(ROOT / "docker-compose.yml")
    assert isinstance(doc, dict)
    return doc


def _bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of the ./ bind mounts of a compose service."""
    mounts = {}
    for volume in service.get("volumes", []):
        host, container, *_ = volume.split(":")
        if host.startswith("./"):
            mounts[container] = ROOT / host
    return mounts


def test_compose_matches_the_compose_spec() -> None:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendor.joinpath("compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(_compose())
    ]
    assert not errors


def test_compose_services() -> None:
    services = _compose()["services"]
    for name in ("mosquitto", "emqx", "minio", "minio-init", "prometheus", "grafana", "loadgen"):
        assert name in services
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    assert services["emqx"]["image"].startswith("emqx/emqx:5")
    assert services["loadgen"]["profiles"] == ["load"]
    assert "profiles" not in services["dtb-0"]
    for name, service in services.items():
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for container, host in _bind_mounts(service).items():
            assert host.exists(), f"{name}: {host} (mounted at {container}) is missing"
    for name in WORKERS:
        worker = services[name]
        assert worker["build"] == "."
        assert worker["read_only"] is True
        assert f"{ETC}/config.yaml" in _bind_mounts(worker)
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(worker["environment"])
        assert worker["depends_on"]["minio-init"]["condition"] == ("service_completed_successfully")
    conf = (DEPLOY / "compose" / "mosquitto.conf").read_text()
    directives = dict(
        line.split(None, 1) for line in conf.splitlines() if line and not line.startswith("#")
    )
    assert directives["listener"] == "1883"
    assert directives["allow_anonymous"] == "true"
    assert directives["persistence"] == "true"
    assert int(directives["max_inflight_messages"]) == 1000
    queued = int(directives["max_queued_messages"])
    assert queued == 0 or queued >= 100_000


def test_compose_worker_configs(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, secret_files: dict[str, str]
) -> None:
    services = _compose()["services"]
    bucket_job = " ".join(services["minio-init"]["entrypoint"])
    configs: dict[str, BridgeConfig] = {}
    for name in WORKERS:
        raw = _yaml(_bind_mounts(services[name])[f"{ETC}/config.yaml"])
        assert raw["instance_id"] == name
        assert raw["backup"]["s3"] == {
            "bucket": "mqtt-archive",
            "prefix": "archive/",
            "endpoint_url": "http://minio:9000",
            "region": "us-east-1",
            "mode": "best_effort",
        }
        assert "/mqtt-archive" in bucket_job, "minio-init creates the bucket the workers use"
        raw = _localize(raw, ETC, tmp_path / name, secret_files)
        cfg = configs[f"{name}.yaml"] = _bridge_config(raw, tmp_path / f"{name}.yaml")
        grace = _seconds(services[name]["stop_grace_period"])
        assert cfg.shutdown.deadline < grace, f"{name}: stop_grace_period <= shutdown.deadline"
        assert cfg.http.host_port == ("0.0.0.0", 9100)
    assert not cross_check(configs)
    dtb, btd = configs["dtb-0.yaml"], configs["btd-0.yaml"]
    assert (dtb.direction, btd.direction) == ("dtb", "btd")
    assert [(r.source, r.share_group, r.target) for r in dtb.routes] == [
        ("devices/+/telemetry", "telemetry-svc", "dt/{1}/telemetry")
    ]
    assert [(r.source, r.share_group, r.target) for r in btd.routes] == [
        ("cmd/+/set", "btd", "devices/{1}/commands")
    ]
    assert (dtb.source.host, dtb.target.host) == ("mosquitto", "emqx")
    assert (btd.source.host, btd.target.host) == ("emqx", "mosquitto")


def test_prometheus_and_grafana_wiring() -> None:
    services = _compose()["services"]
    prom_mounts = _bind_mounts(services["prometheus"])
    prom = _yaml(prom_mounts["/etc/prometheus/prometheus.yml"])
    assert [prom_mounts[f] for f in prom["rule_files"]] == [DEPLOY / "prometheus" / "alerts.yml"]
    (job,) = prom["scrape_configs"]
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{name}:9100" for name in WORKERS}
    assert job.get("metrics_path", "/metrics") == "/metrics"

    grafana = services["grafana"]
    mounts = _bind_mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    (source,) = _yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    (provider,) = _yaml(provisioning / "dashboards" / "mqtt-bridge.yml")["providers"]
    dashboards = {c: h for c, h in mounts.items() if c.startswith(provider["options"]["path"])}
    assert list(dashboards.values()) == [DEPLOY / "grafana" / "mqtt-bridge.json"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home in dashboards


def test_loadgen_script_parses() -> None:
    script = DEPLOY / "compose" / "loadgen.sh"
    subprocess.run(["sh", "-n", str(script)], check=True)
    text = script.read_text()
    assert "devices/dev-$d/telemetry" in text
    assert "cmd/dev-$d/set" in text


# --- Kubernetes ---------------------------------------------------------------------------


def _kustomization(directory: Path) -> dict[str, Any]:
    return _yaml(directory / "kustomization.yaml")


def _base_resources() -> list[dict[str, Any]]:
    base = K8S / "base"
    return [doc for f in _kustomization(base)["resources"] for doc in _yaml_all(base / f)]


def _by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def _schema_errors(doc: dict[str, Any]) -> list[str]:
    if doc["apiVersion"] == "monitoring.coreos.com/v1":
        return []  # a CRD: checked by _check_service_monitor
    errors = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(map(str, exc.path))
            errors.append(
                f"{doc['kind']} {doc['metadata']['name']} (k8s {version}) {where}: {exc.message}"
            )
    return errors


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _check_wiring(docs: list[dict[str, Any]]) -> None:
    """Selectors select the pods; references point at resources that exist."""
    sts = _by_kind(docs, "StatefulSet")
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert _matches(sts["spec"]["selector"]["matchLabels"], pod_labels)
    service = _by_kind(docs, "Service")
    assert service["spec"]["clusterIP"] == "None", "the StatefulSet's governing service"
    assert sts["spec"]["serviceName"] == service["metadata"]["name"]
    assert _matches(service["spec"]["selector"], pod_labels)
    pdb = _by_kind(docs, "PodDisruptionBudget")
    assert _matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    policy = _by_kind(docs, "NetworkPolicy")
    assert _matches(policy["spec"]["podSelector"]["matchLabels"], pod_labels)
    hpa = _by_kind(docs, "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("StatefulSet", sts["metadata"]["name"])
    monitor = _by_kind(docs, "ServiceMonitor")
    assert _matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    assert {e.get("path", "/metrics") for e in monitor["spec"]["endpoints"]} == {"/metrics"}
    assert (
        sts["spec"]["template"]["spec"]["serviceAccountName"]
        == (_by_kind(docs, "ServiceAccount")["metadata"]["name"])
    )


def test_kubernetes_base_matches_schemas() -> None:
    docs = _base_resources()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "ServiceAccount",
            "StatefulSet",
            "Service",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
            "NetworkPolicy",
            "ServiceMonitor",
        ]
    )
    assert [e for d in docs for e in _schema_errors(d)] == []
    _check_wiring(docs)


def test_statefulset_pod_spec() -> None:
    sts = _by_kind(_base_resources(), "StatefulSet")
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert "replicas" not in sts["spec"], "the HPA owns replicas"
    pod = sts["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == GRACE_SECONDS
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    env = {e["name"]: e for e in container["env"]}
    assert env["BRIDGE_INSTANCE_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["BRIDGE_HTTP__LISTEN"]["value"] == "0.0.0.0:9100"
    assert container["args"] == ["run", "--config", f"{ETC}/config.yaml"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == 9100
    assert container["resources"]["requests"]["cpu"], "the HPA's CPU target needs a request"
    assert container["resources"]["limits"]["memory"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts[f"{ETC}/config.yaml"]["subPath"] == "config.yaml"
    assert "configMap" in volumes[mounts[f"{ETC}/config.yaml"]["name"]]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]], "writable /tmp on a read-only root"
    for directory, files in (("tls", {"ca.pem", "cert.pem", "key.pem"}), ("secrets", {"password"})):
        mount = mounts[f"{ETC}/{directory}"]
        assert mount["readOnly"] is True
        secret = volumes[mount["name"]]["secret"]
        assert {item["path"] for item in secret["items"]} == files


def _mounted_files(sts: dict[str, Any]) -> set[str]:
    """Files the bridge container can read from secrets and config maps."""
    pod = sts["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    files = set()
    for mount in pod["containers"][0]["volumeMounts"]:
        source = volumes[mount["name"]].get("secret") or volumes[mount["name"]].get("configMap")
        if source is None:
            continue
        if "subPath" in mount:
            files.add(mount["mountPath"])
        else:
            files |= {f"{mount['mountPath']}/{item['path']}" for item in source["items"]}
    return files


def test_overlays_reference_what_exists() -> None:
    base = {(d["kind"], d["metadata"]["name"]): d for d in _base_resources()}
    for name in OVERLAYS:
        overlay = K8S / "overlays" / name
        kustomization = _kustomization(overlay)
        assert kustomization["nameSuffix"] == f"-{name}"
        for resource in kustomization["resources"]:
            assert (overlay / resource).exists(), f"{name}: resource {resource}"
        for generator in kustomization["configMapGenerator"]:
            for file in generator["files"]:
                assert (overlay / file.split("=")[-1]).is_file()
        for patch in kustomization["patches"]:
            doc = _yaml(overlay / patch["path"])
            key = (doc["kind"], doc["metadata"]["name"])
            assert key in base, f"{name}/{patch['path']} patches {key}, not in the base"
            assert doc["apiVersion"] == base[key]["apiVersion"]
            # A strategic merge patch merges list items by name: a typo adds a new item.
            if doc["kind"] == "StatefulSet":
                want, have = doc["spec"]["template"]["spec"], base[key]["spec"]["template"]["spec"]
                for field in ("containers", "volumes"):
                    names = {item["name"] for item in have[field]}
                    assert {item["name"] for item in want.get(field, [])} <= names, field
        labels = kustomization["labels"][0]
        assert labels["pairs"] == {"app.kubernetes.io/component": name}
        assert labels["includeSelectors"] is True


def test_kubernetes_configs(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, secret_files: dict[str, str]
) -> None:
    sts = _by_kind(_base_resources(), "StatefulSet")
    readable = _mounted_files(sts)
    configs = {}
    for name in OVERLAYS:
        raw = _yaml(K8S / "overlays" / name / "config.yaml")
        assert "instance_id" not in raw, "BRIDGE_INSTANCE_ID (the pod name) sets it"
        named = {s for s in _strings(raw) if s.startswith(f"{ETC}/")}
        assert named, "TLS files and the password come from mounted secrets"
        assert named <= readable, f"{name}: config names files no volume provides"
        clean_env.setenv("BRIDGE_INSTANCE_ID", f"mqtt-bridge-{name}-0")
        local = _localize(raw, ETC, tmp_path / name, secret_files)
        cfg = configs[name] = _bridge_config(local, tmp_path / f"{name}.yaml")
        assert cfg.instance_id == f"mqtt-bridge-{name}-0"
        assert cfg.direction == name
        assert cfg.shutdown.deadline < GRACE_SECONDS
        assert cfg.http.host_port == ("0.0.0.0", 9100)
        cloud = raw["target"] if name == "dtb" else raw["source"]
        assert re.fullmatch(
            r"mqtts://[\w-]+-ats\.iot\.[\w-]+\.amazonaws\.com:(8883|443)", cloud["url"]
        )
        assert cloud["profile"] == "aws-iot"
        assert set(cloud["tls"]) >= {"ca_file", "cert_file", "key_file", "server_name"}
        if cloud["url"].endswith(":443"):
            assert cloud["tls"].get("alpn") == ["x-amzn-mqtt-ca"], "IoT Core on 443 needs ALPN"
        assert raw["backup"]["s3"]["bucket"]
    assert not cross_check(configs)
    assert configs["dtb"].target.connections > 1
    assert [(r.source, r.share_group, r.target) for r in configs["dtb"].routes] == [
        ("devices/+/telemetry", "telemetry-svc", "dt/{1}/telemetry")
    ]
    assert [(r.source, r.share_group, r.target) for r in configs["btd"].routes] == [
        ("cmd/+/set", "btd", "devices/{1}/commands")
    ]


def test_network_policy_and_autoscaler() -> None:
    docs = _base_resources()
    policy = _by_kind(docs, "NetworkPolicy")["spec"]
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    (ingress,) = policy["ingress"]
    assert [p["port"] for p in ingress["ports"]] == [9100]
    assert all("namespaceSelector" in peer for peer in ingress["from"])
    egress = {
        (p.get("protocol", "TCP"), p["port"]) for rule in policy["egress"] for p in rule["ports"]
    }
    assert {("UDP", 53), ("TCP", 53), ("TCP", 1883), ("TCP", 8883), ("TCP", 443)} <= egress
    hpa = _by_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    pin = _yaml(K8S / "overlays" / "dtb" / "horizontalpodautoscaler-patch.yaml")["spec"]
    assert pin["minReplicas"] == pin["maxReplicas"], "DTB's count is the migration dial"


def _kustomize(overlay: Path) -> list[dict[str, Any]]:
    if shutil.which("kustomize"):
        command = ["kustomize", "build", str(overlay)]
    elif shutil.which("kubectl"):
        command = ["kubectl", "kustomize", str(overlay)]
    else:
        pytest.skip("neither kustomize nor kubectl: rendered overlays not checked")
    done = subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.mark.parametrize("name", OVERLAYS)
def test_rendered_overlay(name: str) -> None:
    docs = _kustomize(K8S / "overlays" / name)
    assert [e for d in docs for e in _schema_errors(d)] == []
    _check_wiring(docs)
    component = {"app.kubernetes.io/component": name}
    for doc in docs:
        assert doc["metadata"]["namespace"] == "mqtt-bridge"
        assert doc["metadata"]["name"].startswith("mqtt-bridge")
        assert f"-{name}" in doc["metadata"]["name"]
    sts = _by_kind(docs, "StatefulSet")
    assert _matches(component, sts["spec"]["template"]["metadata"]["labels"])
    monitor = _by_kind(docs, "ServiceMonitor")
    assert _matches(component, monitor["spec"]["selector"]["matchLabels"]), "one direction each"
    # The label transformer must not have narrowed the DNS or monitoring peers.
    policy = _by_kind(docs, "NetworkPolicy")["spec"]
    for rule in policy["ingress"] + policy["egress"]:
        for peer in rule.get("from", []) + rule.get("to", []):
            assert "podSelector" not in peer, peer
    pod = sts["spec"]["template"]["spec"]
    config_map = _by_kind(docs, "ConfigMap")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    overlay_config = (K8S / "overlays" / name / "config.yaml").read_text()
    assert config_map["data"]["config.yaml"] == overlay_config
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {f"mqtt-bridge-{name}-tls", f"mqtt-bridge-{name}-broker"}
    # The manifests deploy the release they ship with.
    assert pod["containers"][0]["image"].endswith(f":{__version__}")


# --- ECS ----------------------------------------------------------------------------------


def _container(taskdef: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in taskdef["containerDefinitions"] if c["name"] == name]
    return found


def test_ecs_files_are_valid_api_inputs() -> None:
    session = botocore.session.get_session()
    ecs = session.get_service_model("ecs")
    scaling = session.get_service_model("application-autoscaling")
    validator = ParamValidator()

    def problems(params: dict[str, Any], model: Any, operation: str) -> str:
        shape = model.operation_model(operation).input_shape
        return validator.validate(params, shape).generate_report()

    for name in OVERLAYS:
        assert not problems(_json(ECS / f"taskdef-{name}.json"), ecs, "RegisterTaskDefinition")
        assert not problems(_json(ECS / f"service-{name}.json"), ecs, "CreateService")
        auto = _json(ECS / f"autoscaling-{name}.json")
        assert not problems(auto["RegisterScalableTarget"], scaling, "RegisterScalableTarget")
        for policy in auto["PutScalingPolicy"]:
            assert not problems(policy, scaling, "PutScalingPolicy")


@pytest.mark.parametrize("name", OVERLAYS)
def test_ecs_task_and_service(name: str) -> None:
    taskdef = _json(ECS / f"taskdef-{name}.json")
    bridge, init = _container(taskdef, "bridge"), _container(taskdef, "init")
    assert bridge["essential"] is True
    assert init["essential"] is False
    assert bridge["dependsOn"] == [{"containerName": "init", "condition": "SUCCESS"}]
    assert bridge["readonlyRootFilesystem"] is True
    assert init["readonlyRootFilesystem"] is True
    uid = bridge["user"].split(":")[0]
    assert uid.isdigit()
    assert uid != "0"
    assert bridge["stopTimeout"] > 20, "longer than shutdown.deadline"
    assert bridge["healthCheck"]["command"] == ["CMD", "mqtt-bridge", "health"]
    assert bridge["restartPolicy"]["enabled"] is True
    assert 0 in bridge["restartPolicy"]["ignoredExitCodes"], "a graceful exit is final"
    assert bridge["linuxParameters"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["containerPath"]: m for m in bridge["mountPoints"]}
    assert mounts[ETC]["readOnly"] is True
    assert {m["sourceVolume"] for m in init["mountPoints"]} == {mounts[ETC]["sourceVolume"]}
    assert {"name": "DIRECTION", "value": name} in init["environment"]
    assert f"chown -R {bridge['user']}" in init["command"][0]
    assert [p["containerPort"] for p in bridge["portMappings"]] == [9100]
    assert {c["image"] for c in taskdef["containerDefinitions"]} == {bridge["image"]}
    assert bridge["image"].endswith(f":{__version__}")

    service = _json(ECS / f"service-{name}.json")
    assert service["taskDefinition"] == taskdef["family"]
    auto = _json(ECS / f"autoscaling-{name}.json")
    resource = f"service/{service['cluster']}/{service['serviceName']}"
    assert auto["RegisterScalableTarget"]["ResourceId"] == resource
    assert {p["ResourceId"] for p in auto["PutScalingPolicy"]} == {resource}
    target = auto["RegisterScalableTarget"]
    if name == "dtb":
        assert target["MinCapacity"] == target["MaxCapacity"], "DTB's count is the migration dial"


class _TaskMetadata(BaseHTTPRequestHandler):
    task_arn = (
        "arn:aws:ecs:eu-west-1:123456789012:task/mqtt-bridge/0123456789abcdef0123456789abcdef"
    )

    def do_GET(self) -> None:
        if self.path != "/v4/x/task":
            self.send_error(404)
            return
        body = json.dumps({"TaskARN": self.task_arn}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def task_metadata() -> Iterator[str]:
    """A stand-in for the ECS task metadata endpoint (v4) on loopback."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _TaskMetadata)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v4/x"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("slot", ["", "dtb-3"])
def test_ecs_init_writes_what_the_bridge_reads(
    slot: str,
    tmp_path: Path,
    clean_env: pytest.MonkeyPatch,
    secret_files: dict[str, str],
    task_metadata: str,
) -> None:
    taskdef = _json(ECS / "taskdef-dtb.json")
    bridge, init = _container(taskdef, "bridge"), _container(taskdef, "init")
    (out_mount,) = [m["containerPath"] for m in init["mountPoints"]]
    out = tmp_path / "volume"
    out.mkdir()
    script = (
        init["command"][0].replace(out_mount + "/", f"{out}/").replace(f"{out_mount}\n", f"{out}\n")
    )
    # chown needs root; the test only records it. `python` is the image's interpreter.
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "chown").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/chown.args\n')
    (shims / "chown").chmod(0o755)
    (shims / "python").symlink_to(sys.executable)
    fake = {
        "CONFIG_YAML": (K8S / "overlays" / "dtb" / "config.yaml").read_text(),
        "BROKER_PASSWORD": "s3cret",
        "TLS_CA": secret_files["ca.pem"],
        "TLS_CERT": secret_files["cert.pem"],
        "TLS_KEY": secret_files["key.pem"],
    }
    env = {e["name"]: e["value"] for e in init["environment"]}
    env |= {s["name"]: fake[s["name"]] for s in init["secrets"]}
    env |= {
        "INSTANCE_ID": slot,
        "PATH": f"{shims}:/usr/bin:/bin",
        "ECS_CONTAINER_METADATA_URI_V4": task_metadata,
    }
    done = subprocess.run(
        [*init["entryPoint"], script],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"init script failed: {done.stderr}"

    raw = _yaml(out / "config.yaml")
    task_id = _TaskMetadata.task_arn.rsplit("/", 1)[1]
    assert raw["instance_id"] == (slot or f"dtb-{task_id}")
    assert (tmp_path / "chown.args").read_text().split() == ["-R", bridge["user"], str(out)]
    password = out / "secrets" / "password"
    assert password.read_text() == "s3cret"
    assert stat.S_IMODE(password.stat().st_mode) == 0o440
    # Every file the config names is where the bridge container will find it.
    (etc_mount,) = [m["containerPath"] for m in bridge["mountPoints"] if m["readOnly"]]
    for path in {s for s in _strings(raw) if s.startswith(etc_mount + "/")}:
        assert (out / path.removeprefix(etc_mount + "/")).is_file(), path
    local = json.loads(json.dumps(raw).replace(f'"{etc_mount}/', f'"{out}/'))
    cfg = _bridge_config(local, tmp_path / "effective.yaml")
    assert cfg.instance_id == raw["instance_id"]
    assert cfg.target.password is None
    assert cfg.source.password is not None
    assert cfg.source.password.get_secret_value() == "s3cret"


# --- Prometheus and Grafana ---------------------------------------------------------------


def _rules() -> list[dict[str, Any]]:
    doc = _yaml(DEPLOY / "prometheus" / "alerts.yml")
    assert set(doc) == {"groups"}
    rules = []
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "rules"}
        rules += group["rules"]
    return rules


def test_alert_rules_parse_and_use_bridge_metrics() -> None:
    rules = _rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        name = rule["alert"]
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
        assert re.fullmatch(r"[A-Za-z_]\w*", name)
        try:
            metrics = _promql_metrics(rule["expr"])
        except ValueError as exc:
            pytest.fail(f"{name}: {exc}")
        assert metrics
        assert metrics <= METRICS, f"{name}: unknown metrics {metrics - METRICS}"
        _seconds(rule.get("for", "0s"))
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        kept = _output_labels(promql_parser.parse(rule["expr"]))
        used = set(re.findall(r"\$labels\.(\w+)", json.dumps(rule["annotations"])))
        if kept is not None:
            assert used <= kept, f"{name}: annotations use labels the expression drops"


def test_alerts_cover_the_operating_conditions() -> None:
    rules = {rule["alert"]: rule for rule in _rules()}

    def rule_for(metric: str) -> dict[str, Any]:
        found = [r for r in rules.values() if f"mqtt_bridge_{metric}" in r["expr"]]
        assert found, f"no alert on mqtt_bridge_{metric}"
        return found[0]

    ready = rule_for("ready")
    assert _seconds(ready["for"]) == 300
    assert "increase(" in rule_for("dead_lettered_total")["expr"]
    assert rule_for("throttled_total")
    saturated = rule_for("inflight_messages_limit")
    assert "0.9" in saturated["expr"]
    assert _seconds(saturated["for"]) == 600
    assert re.search(r">\s*300\b", rule_for("archive_lag_seconds")["expr"])
    assert rule_for("archive_failures_total")
    stale = rule_for("heartbeat_age_seconds")
    assert "mqtt_bridge_heartbeat_stale_after_seconds" in stale["expr"]
    assert stale["labels"]["severity"] == "critical"
    assert rule_for("failovers_total")
    assert 'index!="0"' in rule_for("endpoint_active")["expr"]


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows


def _grafana_expr(expr: str) -> str:
    """Grafana's interval variables become a duration PromQL accepts."""
    return re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)


def test_dashboard_panels_query_bridge_metrics() -> None:
    dashboard = _json(DEPLOY / "grafana" / "mqtt-bridge.json")
    assert dashboard["uid"] == "mqtt-bridge"
    ids = [panel["id"] for panel in _panels(dashboard)]
    assert len(ids) == len(set(ids))
    used: set[str] = set()
    for panel in _panels(dashboard):
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        title = panel["title"]
        assert panel["targets"], f"{title}: no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            try:
                metrics = _promql_metrics(_grafana_expr(target["expr"]))
            except ValueError as exc:
                pytest.fail(f"{title}: {exc}: {target['expr']}")
            assert metrics, f"{title}: no metric in {target['expr']}"
            assert metrics <= METRICS, f"{title}: unknown metrics {metrics - METRICS}"
            used |= metrics
    wanted = {
        "received_total",
        "published_total",
        "e2e_latency_seconds_bucket",
        "inflight_messages",
        "inflight_messages_limit",
        "dead_lettered_total",
        "dropped_total",
        "throttled_total",
        "reconnects_total",
        "ready",
        "archive_lag_seconds",
        "heartbeat_age_seconds",
        "heartbeat_latency_seconds_bucket",
        "endpoint_active",
        "failovers_total",
    }
    assert {f"mqtt_bridge_{m}" for m in wanted} <= used
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            metric = re.search(r"label_values\((\w+)", variable["query"]["query"])
            assert metric
            assert metric[1] in METRICS


# --- docs ---------------------------------------------------------------------------------


def test_docs_point_at_files_that_exist() -> None:
    migration = (ROOT / "docs" / "migration.md").read_text()
    for phase in ("Preparation", "Backend migration", "Device migration", "Cleanup"):
        assert re.search(rf"^## \d\. {phase}", migration, re.MULTILINE), phase
    for doc in (ROOT / "docs" / "migration.md", ECS / "README.md"):
        for path in set(re.findall(r"\bdeploy/[\w./{},-]*[\w}]", doc.read_text())):
            for expanded in _braces(path):
                assert (ROOT / expanded).exists(), f"{doc.name} names {expanded}"


def _braces(path: str) -> list[str]:
    """deploy/x/{a,b} -> deploy/x/a, deploy/x/b."""
    match = re.search(r"\{([^}]*)\}", path)
    if not match:
        return [path]
    return [
        p
        for option in match[1].split(",")
        for p in _braces(path[: match.start()] + option + path[match.end() :])
    ]
