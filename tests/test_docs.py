"""Static checks of the documentation: it names files that exist, every setting and module,
and the operator's first questions (how to deploy and monitor)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from bridge.config import BridgeConfig
from bridge.loader import NESTING, variables
from tests.test_deploy import _braces

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = [ROOT / "README.md", ROOT / "docs" / "migration.md", ROOT / "bench" / "README.md"]
DOCS += sorted((ROOT / "deploy").rglob("*.md"))


def section(title: str) -> str:
    return README.split(f"\n{title}\n", 1)[1].split("\n## ", 1)[0]


def test_docs_name_only_files_that_exist() -> None:
    for doc in DOCS:
        text = doc.read_text()
        assert "DESIGN.md" not in text, f"{doc.name} points at a DESIGN.md the repo lacks"
        paths = re.findall(r"`((?:bridge|deploy|docs|bench|tests|scripts)/[\w./{},-]*\w)/?`", text)
        for path in paths:
            for expanded in _braces(path):
                assert (ROOT / expanded).exists(), f"{doc.relative_to(ROOT)} names {expanded}"


def test_deploying_and_monitoring_covers_every_artifact() -> None:
    text = section("## Deploying and monitoring")
    for thing in ("image", "Kubernetes", "ECS", "alerts", "dashboard", "migration guide"):
        assert thing in text, thing
    for artifact in (
        "Dockerfile", "docker-compose.yml", "deploy/kubernetes/", "deploy/ecs/",
        "deploy/prometheus/alerts.yml", "deploy/prometheus/alerts.test.yml",
        "deploy/grafana/mqtt-bridge.json", "docs/migration.md",
    ):  # fmt: skip
        assert f"`{artifact}`" in text, artifact


def test_every_setting_is_in_the_configuration_reference() -> None:
    names, _ = variables(BridgeConfig)
    keys = {name.split(NESTING)[-1].removeprefix("BRIDGE_").lower() for name in names}
    missing = sorted(k for k in keys if f"{k}:" not in README and f"`{k}`" not in README)
    assert missing == []


def test_the_architecture_table_lists_every_module() -> None:
    table = section("## Architecture")
    modules = {p.name for p in (ROOT / "bridge").glob("*.py")} - {"__init__.py", "__main__.py"}
    missing = sorted(m for m in modules if f"`{m}`" not in table)
    assert missing == []


def test_every_metric_is_in_the_catalogue() -> None:
    from tests.test_operations import CATALOGUE

    table = section("## HTTP endpoints and metrics")
    for name in CATALOGUE:
        assert name in table, name


def test_ecs_log_group_creation_is_explained() -> None:
    ecs = ROOT / "deploy" / "ecs"
    creates = [
        container["name"]
        for taskdef in ecs.glob("taskdef-*.json")
        for container in json.loads(taskdef.read_text())["containerDefinitions"]
        if container.get("logConfiguration", {}).get("options", {}).get("awslogs-create-group")
        == "true"
    ]
    if creates:
        assert "logs:CreateLogGroup" in (ecs / "README.md").read_text()
