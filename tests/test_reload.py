"""Live reload: what a reload may change (pure), how pacing and the log level take a new
value, and SIGHUP on a real worker — a bad file changes nothing, a good one applies only
the live keys."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from bridge.cohort import position
from bridge.config import BridgeConfig
from bridge.pacing import Pacer, Pacing
from bridge.reload import LiveSettings, plan
from bridge.runtime import set_log_level, setup_logging
from tests.conftest import Rig
from tests.harness import ROOT, Collector, Publisher, wait_until
from tests.test_links import Factory, Outcomes, envelope, running, target_link

BASE: dict[str, Any] = {
    "instance_id": "dtb-0",
    "direction": "dtb",
    "source": {"url": "mqtt://127.0.0.1:1883"},
    "target": {"url": "mqtt://127.0.0.1:1884", "limits": {"publish_rate": 100}},
    "routes": [
        {"source": "devices/+/telemetry", "share_group": "svc-a", "target": "dt/{1}/telemetry"},
        {
            "source": "devices/+/status",
            "mode": "copy",
            "target": "dt/{1}/status",
            "device": "{1}",
            "cohort": {"percent": 5},
        },
    ],
}


def config(**changes: Any) -> BridgeConfig:
    raw = json.loads(json.dumps(BASE))
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
        node[int(last) if last.isdigit() else last] = value
    return BridgeConfig(**raw)


def test_plan_applies_live_keys_and_lists_the_rest() -> None:
    running = config()
    new = config(
        routes__1__cohort={"percent": 20},
        target__limits__publish_rate=50,
        target__limits__burst=0.5,
        log__level="warning",
        flow__max_inflight=10,
        target__keepalive=30,
    )
    decided = plan(running, LiveSettings.of(running), new)
    assert decided.changed == [
        "routes[1].cohort",
        "target.limits.publish_rate",
        "target.limits.burst",
        "log.level",
    ]
    assert decided.needs_restart == ["flow.max_inflight", "target.keepalive"]
    gate = decided.live.gates[1]
    assert gate is not None
    assert gate.cohort.percent == 20
    assert decided.live.publish_rate == 50
    # Nothing changed: nothing to do.
    again = plan(running, decided.live, new)
    assert (again.changed, again.needs_restart) == ([], ["flow.max_inflight", "target.keepalive"])


def test_a_cohort_follows_its_id_files(tmp_path: Path) -> None:
    canary = tmp_path / "canary.txt"
    canary.write_text("dev-1\n")
    cohort = {"percent": 5, "include_file": str(canary)}
    running = config(routes__1__cohort=cohort)
    canary.write_text("dev-1\ndev-2\n")  # same configuration, new file content
    decided = plan(running, LiveSettings.of(running), config(routes__1__cohort=cohort))
    assert decided.changed == ["routes[1].cohort"]
    gate = decided.live.gates[1]
    assert gate is not None
    assert gate.cohort.include == {"dev-1", "dev-2"}


def test_a_route_that_needs_a_restart_keeps_its_cohort() -> None:
    running = config()
    live = LiveSettings.of(running)
    # Its mapping changed: the new cohort belongs to a route that is not running yet.
    moved = config(routes__1__target="v2/{1}/status", routes__1__cohort={"percent": 50})
    decided = plan(running, live, moved)
    assert decided.changed == []
    assert decided.needs_restart == ["routes[1].target"]
    assert decided.live.gates == live.gates
    # A route added: every cohort stays, the routes need a restart.
    more = json.loads(json.dumps(BASE))
    more["routes"].append({"source": "other/#", "target": "o/{1}"})
    more["routes"][1]["cohort"] = {"percent": 50}
    decided = plan(running, live, BridgeConfig(**more))
    assert decided.needs_restart == ["routes"]
    assert decided.live.gates == live.gates
    # Cohort on, cohort off: both live.
    off = json.loads(json.dumps(BASE))
    del off["routes"][1]["cohort"]
    decided = plan(running, live, BridgeConfig(**off))
    assert decided.changed == ["routes[1].cohort"]
    assert decided.live.gates[1] is None


def test_pacer_takes_new_rates() -> None:
    pacer = Pacer(Pacing(publish_rate=10, burst=1.0), window=100, now=0.0)
    assert pacer.rate_limit == 10
    for _ in range(10):
        assert pacer.delay(1, 0.0) == 0
    assert pacer.delay(1, 0.0) == pytest.approx(0.1)
    pacer.repace(Pacing(publish_rate=1000, burst=1.0), now=0.0)
    assert pacer.rate_limit == 1000
    assert pacer.delay(1, 0.0) == pytest.approx(0.001)  # still empty, refilled at the new rate
    pacer.throttled(1.0)  # 0x97: half speed, also after the next change
    pacer.repace(Pacing(publish_rate=200, burst=1.0), now=1.0)
    assert pacer.rate_limit == pytest.approx(100)
    # Unpaced: the throttle moves to the window; paced again: back to the rate.
    pacer.repace(Pacing(), now=1.0)
    assert (pacer.paced, pacer.rate_limit, pacer.window) == (False, 0, 50)
    pacer.repace(Pacing(bytes_rate=1000), now=1.0)
    assert (pacer.paced, pacer.window) == (True, 50)
    pacer.repace(Pacing(publish_rate=10), now=1.0)
    assert (pacer.window, pacer.rate_limit) == (100, 5)


async def test_target_link_repaces_a_connection_waiting_for_tokens() -> None:
    factory, outcomes = Factory(), Outcomes()
    link = target_link(factory, outcomes)
    # One token, then one every 100 s.
    link.pacer.repace(Pacing(publish_rate=0.01, burst=0.1), asyncio.get_running_loop().time())
    async with running(link):
        conn = await factory.connected(1)
        for n in range(3):
            link.submit(envelope(n))
        assert [p for _, _, p in conn.published] == [b"0"]
        link.repace(Pacing(publish_rate=1000, burst=1.0))
        for _ in range(500):
            if len(conn.published) == 3:
                break
            await asyncio.sleep(0.01)
        assert [p for _, _, p in conn.published] == [b"0", b"1", b"2"]
        assert link.stats().rate_limit == 1000


def test_log_level_reaches_loggers_bound_before_the_change(
    capfd: pytest.CaptureFixture[str],
) -> None:
    try:
        setup_logging("json", "warning")
        log = structlog.get_logger().bind(component="early")
        log.info("quiet.before")
        set_log_level("info")
        log.info("loud.after")
        set_log_level("error")
        log.warning("quiet.again")
        log.error("still.shown")
        err = capfd.readouterr().err
    finally:
        structlog.reset_defaults()
    assert "quiet.before" not in err
    assert "loud.after" in err
    assert "quiet.again" not in err
    assert "still.shown" in err


# ---- SIGHUP on a running worker ----------------------------------------------------

DEVICES = [f"d{i:03d}" for i in range(300)]


def test_bad_reload_changes_nothing_and_a_good_one_applies_only_live_keys(
    rig: Rig, tmp_path: Path
) -> None:
    p = rig.prefix
    canary = tmp_path / "canary.txt"
    canary.write_text("")
    newcomer = next(d for d in DEVICES if position(d) > 30)

    def route(percent: Any, **cohort: Any) -> dict[str, Any]:
        return {
            "source": f"{p}/+/+",
            "name": "shadow",
            "mode": "copy",
            "target": f"{p}-dt/{{1}}/{{2}}",
            "device": "{1}",
            "cohort": {"percent": percent, "include_file": str(canary), **cohort},
        }

    worker = rig.worker([route(10)], target={"limits": {"publish_rate": 500}})
    base = worker.cfg

    def rewrite_and_reload(cfg: dict[str, Any], result: str) -> None:
        before = worker.metrics()[f"reloads{{result={result}}}"]
        worker.config_path.write_text(yaml.safe_dump(cfg))
        worker.signal(signal.SIGHUP)
        wait_until(
            lambda: worker.metrics()[f"reloads{{result={result}}}"] == before + 1, 30, what=result
        )

    def round_of_traffic(n: int) -> set[str]:
        """One message per device; the devices whose message reached the target."""
        with (
            Collector(rig.target.url, f"{p}-dt/+/{n}") as target,
            Publisher(rig.source.url) as pub,
        ):
            before = worker.metrics()
            for d in DEVICES:
                pub.publish(f"{p}/{d}/{n}", 0)
            pub.wait_acked()
            wait_until(
                lambda: worker.metrics()["acknowledged"] == before["acknowledged"] + len(DEVICES),
                30,
                what="round",
            )
            target.wait_for(int(worker.metrics()["published"] - before["published"]), 10)
            return {msg.topic.split("/")[1] for msg in target.messages}

    in10 = {d for d in DEVICES if position(d) < 10}
    assert round_of_traffic(0) == in10

    # A file that fails validation: two problems, refused as a whole.
    bad = {
        **base,
        "routes": [route(150, exclude_file=str(tmp_path / "missing.txt"))],
        "target": {**base["target"], "limits": {"publish_rate": 5}},
    }
    rewrite_and_reload(bad, "refused")
    checked = subprocess.run(
        [sys.executable, "-m", "bridge", "check", "--config", str(worker.config_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 2
    refused = [
        json.loads(line)
        for line in worker.log_path.read_text().splitlines()
        if '"reload.refused"' in line
    ]
    assert len(refused) == 1
    # The same one-line errors as `check`.
    assert [f"error: {e}" for e in refused[0]["errors"]] == checked.stderr.splitlines()
    assert len(refused[0]["errors"]) == 2
    m = worker.metrics()
    assert m["cohort_percent{route=shadow}"] == 10
    assert m["connection_rate_limit_messages_per_second{connection=0}"] == 500
    assert round_of_traffic(1) == in10  # still the running configuration

    # A good file: new percent, a new canary in the same file, a new rate — applied; a
    # new keepalive and flow bound — not, until a restart.
    canary.write_text(f"{newcomer}\n")
    good = {
        **base,
        "routes": [route(30)],
        "target": {**base["target"], "keepalive": 30, "limits": {"publish_rate": 250}},
        "flow": {"max_inflight": 10},
    }
    rewrite_and_reload(good, "applied")
    log = worker.log_path.read_text().splitlines()
    applied = json.loads(next(line for line in log if '"reload.applied"' in line))
    assert applied["changed"] == ["routes[0].cohort", "target.limits.publish_rate"]
    assert applied["cohorts"] == [{"route": "shadow", "percent": 30, "include": 1, "exclude": 0}]
    restart = json.loads(next(line for line in log if '"reload.needs_restart"' in line))
    assert restart["keys"] == ["flow.max_inflight", "target.keepalive"]
    m = worker.metrics()
    assert m["connection_rate_limit_messages_per_second{connection=0}"] == 250
    assert m["cohort_percent{route=shadow}"] == 30
    assert m["inflight_messages_limit"] == 1000  # the running flow bound stays
    in30 = {d for d in DEVICES if position(d) < 30} | {newcomer}
    assert in10 < in30
    assert round_of_traffic(2) == in30
    assert worker.metrics()["reloads"] == 2
