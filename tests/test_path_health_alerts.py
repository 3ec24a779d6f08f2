"""The path-health and failover alerts, evaluated by the real promtool on series that
play a stale heartbeat and a failover (deploy/prometheus/path-health.test.yml)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.harness import ROOT


def test_path_health_alerts_fire_when_they_should_and_not_before() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    tests = ROOT / "deploy" / "prometheus" / "path-health.test.yml"
    done = subprocess.run(
        [promtool, "test", "rules", str(tests)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
