"""Device cohorts: a pinned hash, membership monotonic in percent, whole devices, and a live
widening (SIGHUP) that only adds devices and loses nothing, against real Mosquitto."""

from __future__ import annotations

import io
import signal
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from bridge.cli import main
from bridge.cohort import Cohort, CohortGate, point, position, read_device_list
from bridge.routing import TopicFilter, TopicTemplate
from tests.conftest import Rig
from tests.harness import Collector, Publisher, Received, check, wait_until

# ---- the hash is a contract ------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        # SHA-256 of the UTF-8 id, first 8 bytes big-endian. Changing these reshuffles
        # every running rollout: never change them.
        ("dev-0", 0x3AA537A4FFA86F7F),
        ("dev-1", 0x0388FB626CA89A12),
        ("device-42", 0x03EB6ABFEFD46CD0),
        ("AA:BB:CC:DD:EE:FF", 0x261900FB1113AA4D),
        ("", 0xE3B0C44298FC1C14),
        ("ü-sensor", 0xE32DDCEDAA058F66),
    ],
)
def test_cohort_hash_is_pinned(device: str, expected: int) -> None:
    assert point(device) == expected
    assert position(device) == pytest.approx(expected * 100 / 2**64)


def test_membership_follows_the_position() -> None:
    # dev-1 sits at 1.38 %, device-42 at 1.53 %, dev-0 at 22.9 %.
    assert "dev-1" in Cohort(1.39)
    assert "dev-1" not in Cohort(1.38)
    assert "device-42" not in Cohort(1.5)
    assert "device-42" in Cohort(1.54)
    assert "dev-0" not in Cohort(22.9)
    assert "dev-0" in Cohort(23)
    assert "dev-0" not in Cohort(0)
    assert "dev-0" in Cohort(100)


percents = st.floats(min_value=0, max_value=100, allow_nan=False)


@given(st.text(), percents, percents)
def test_membership_is_monotonic_in_percent(device: str, a: float, b: float) -> None:
    low, high = sorted((a, b))
    if device in Cohort(low):
        assert device in Cohort(high)


@given(st.text(), percents, st.booleans(), st.booleans())
def test_exclude_wins_over_include(
    device: str, percent: float, included: bool, excluded: bool
) -> None:
    cohort = Cohort(
        percent,
        frozenset([device]) if included else frozenset(),
        frozenset([device]) if excluded else frozenset(),
    )
    if excluded:
        assert device not in cohort
    elif included:
        assert device in cohort
    else:
        assert (device in cohort) == (device in Cohort(percent))


def test_share_matches_the_percent() -> None:
    ids = [f"sensor-{i}" for i in range(100_000)]
    for percent in (1, 5, 10, 50):
        share = sum(device in Cohort(percent) for device in ids) / len(ids) * 100
        assert abs(share - percent) < 0.5, (percent, share)


def test_device_list_file(tmp_path: Path) -> None:
    path = tmp_path / "canary.txt"
    path.write_text("# canary devices\ndev-1\n  dev-2  # the one in the lab\n\n#dev-3\ndev-4\n")
    assert read_device_list(path) == {"dev-1", "dev-2", "dev-4"}
    path.write_bytes(b"dev-1\n\xff\xfe\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_device_list(path)


def test_gate_takes_the_device_from_the_captures() -> None:
    topic_filter = TopicFilter.parse("fleet/+/devices/+/status")
    cohort = Cohort(0, include=frozenset(["eu-d7"]))
    gate = CohortGate(topic_filter, TopicTemplate.parse("{1}-{2}", topic_filter), cohort)
    assert gate.admits("fleet/eu/devices/d7/status")
    assert not gate.admits("fleet/us/devices/d7/status")
    assert not gate.admits("other/topic")
    single = CohortGate(topic_filter, TopicTemplate.parse("{2}", topic_filter), cohort)
    assert single.device_of("fleet/eu/devices/d7/status") == "d7"


def test_cohort_command_tells_which_devices_are_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "out.txt").write_text("dev-1\n")
    route = {
        "source": "devices/+/telemetry",
        "name": "shadow",
        "mode": "copy",
        "device": "{1}",
        "cohort": {"percent": 2, "exclude_file": str(tmp_path / "out.txt")},
    }
    cfg = {
        "instance_id": "s-0",
        "direction": "dtb",
        "source": {"url": "mqtt://127.0.0.1:1883"},
        "target": {"url": "mqtt://127.0.0.1:1884"},
        "routes": [route],
    }
    path = tmp_path / "shadow.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["cohort", "--config", str(path), "device-42", "dev-0", "dev-1"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "device-42\t1.531093\tin\tpercent",
        "dev-0\t22.908352\tout\tpercent",
        "dev-1\t1.380893\tout\texclude_file",
    ]
    monkeypatch.setattr("sys.stdin", io.StringIO("dev-0\n\n"))
    assert main(["cohort", "--config", str(path), "--route", "shadow"]) == 0
    assert capsys.readouterr().out == "dev-0\t22.908352\tout\tpercent\n"
    assert main(["cohort", "--config", str(path), "--route", "other"]) == 2
    assert capsys.readouterr().err == (
        "error: cohort: --route 'other' names no route with a cohort (routes with one: shadow)\n"
    )


# ---- end to end --------------------------------------------------------------------

DEVICES = [f"d{i:04d}" for i in range(1500)]


def _delivered(messages: list[Received]) -> dict[str, dict[str, list[int]]]:
    """device -> phase topic suffix -> numbers delivered (in arrival order)."""
    out: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for msg in messages:
        _, device, phase = msg.topic.split("/")
        out[device][phase].append(int(msg.payload.split(b"|")[1]))
    return out


def test_cohort_is_whole_devices_and_sighup_widens_it_without_loss(
    rig: Rig, tmp_path: Path
) -> None:
    p = rig.prefix
    # Include three devices no percent below 30 holds; exclude three of the 10 %.
    include = [d for d in DEVICES if position(d) > 30][:3]
    exclude = [d for d in DEVICES if position(d) < 10][:3]
    (tmp_path / "canary.txt").write_text("# always in\n" + "\n".join(include) + "\n")
    (tmp_path / "migrated.txt").write_text("\n".join(exclude) + "  # moved already\n")

    def expected(percent: float) -> set[str]:
        return {d for d in DEVICES if position(d) < percent} - set(exclude) | set(include)

    def route(percent: float) -> dict[str, Any]:
        return {
            "source": f"{p}/+/+",
            "name": "shadow",
            "mode": "copy",
            "target": f"{p}-dt/{{1}}/{{2}}",
            "device": "{1}",
            "cohort": {
                "percent": percent,
                "include_file": str(tmp_path / "canary.txt"),
                "exclude_file": str(tmp_path / "migrated.txt"),
            },
        }

    worker = rig.worker([route(10)], instance_id="shadow")
    to_target = lambda t: f"{p}-dt/" + t.split("/", 1)[1]  # noqa: E731
    with (
        Collector(rig.target.url, f"{p}-dt/#") as target,
        Collector(rig.source.url, f"$share/legacy/{p}/+/+") as legacy,
        Publisher(rig.source.url) as pub,
    ):
        # Phase 1: two messages per device at 10 %.
        first = [f"{p}/{d}/a" for d in DEVICES]
        pub.publish_numbered(first, 2 * len(DEVICES))
        pub.wait_acked()
        wait_until(lambda: worker.metrics()["acknowledged"] == 3000, 60, what="phase 1 finished")
        in10 = expected(10)
        target.wait_for(2 * len(in10), 30, stall=3)
        seen = _delivered(target.messages)
        # Whole devices: every device in the cohort got both of its messages, no other any.
        assert set(seen) == in10
        assert all(sorted(seen[d]["a"]) == [0, 1] for d in in10)
        # The share: 10 % of 1,500 within ±3 points (about 4 standard deviations of a binomial).
        assert 105 <= len(in10) <= 195, len(in10)
        assert set(include) <= in10
        assert not set(exclude) & in10
        m = worker.metrics()
        assert m["skipped{reason=cohort,route=shadow}"] == 2 * (len(DEVICES) - len(in10))
        assert m["published{route=shadow}"] == 2 * len(in10)
        assert m["cohort_percent{route=shadow}"] == 10
        # Copy mode: the legacy consumers still get every message.
        legacy.wait_for(3000, 30, stall=3)
        assert check(pub.acked(), legacy.messages).lost == 0

        # Phase 2: four rounds at 1,000 msg/s; widen to 30 % while they flow.
        second = [f"{p}/{d}/b" for d in DEVICES]
        publishing = pub.publish_in_background(second, 4 * len(DEVICES), rate=1000)
        # Round 0 fully taken before the reload: the newly added devices lose round 0 to
        # the old cohort, deterministically, and the reload lands mid-stream.
        wait_until(lambda: worker.metrics()["received"] >= 4500, 60, what="round 0 taken")
        worker.config_path.write_text(yaml.safe_dump({**worker.cfg, "routes": [route(30)]}))
        worker.signal(signal.SIGHUP)
        wait_until(lambda: worker.metrics()["reloads{result=applied}"] == 1, 30, what="reload")
        publishing.join(60)
        # One more round after the reload is known to be applied: every device of the
        # new cohort gets at least this one.
        for d in DEVICES:
            pub.publish(f"{p}/{d}/b", 4)
        pub.wait_acked()
        acked = pub.acked()
        total = 3000 + 5 * len(DEVICES)
        wait_until(lambda: worker.metrics()["acknowledged"] == total, 60, what="phase 2 finished")
        in30 = expected(30)
        m = worker.metrics()
        target.wait_for(int(m["published"]), 30, stall=3)
        seen = _delivered(target.messages)

    assert in10 <= in30
    assert 405 <= len(in30) <= 495, len(in30)
    assert set(seen) == in30  # no device outside the new cohort, every device inside it
    # The 10 % devices lost nothing across the reload, and nothing arrived twice.
    old_topics = {t for t in acked if t.split("/")[1] in in10}
    report = check(
        {t: acked[t] for t in old_topics},
        [msg for msg in target.messages if msg.topic.split("/")[1] in in10],
        to_target,
    )
    assert (report.lost, report.duplicated, report.unexpected, report.out_of_order) == (0, 0, 0, 0)
    assert report.expected == 7 * len(in10)
    # A newly added device: skipped before the switch, then every message from it on.
    added = in30 - in10
    for d in added:
        numbers = seen[d]["b"]
        assert numbers == list(range(numbers[0], 5)), (d, numbers)
        assert numbers[0] >= 1  # round 0 was taken under the 10 % cohort
    everything = check(acked, target.messages, to_target)
    print(
        f"devices={len(DEVICES)} at 10 %: {len(in10)}, at 30 %: {len(in30)} (added {len(added)});"
        f" received={m['received']:.0f} published={m['published']:.0f}"
        f" skipped={m['skipped']:.0f}; 10 % devices: {report}; all: {everything}"
    )
    assert (everything.duplicated, everything.unexpected, everything.out_of_order) == (0, 0, 0)
    assert m["reloads{result=refused}"] == 0
    assert m["cohort_percent{route=shadow}"] == 30
    assert m["received"] == m["published"] + m["skipped"] == total
    assert m["skipped{reason=cohort,route=shadow}"] >= (
        2 * (len(DEVICES) - len(in10)) + 5 * (len(DEVICES) - len(in30)) + len(added)
    )
