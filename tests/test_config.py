"""Promise 3 (configuration half): one precise line per problem, exit 2, no traceback, no secret."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.cli import main

BASE: dict[str, Any] = {
    "instance_id": "dtb-0",
    "direction": "dtb",
    "source": {"url": "mqtt://127.0.0.1:1883", "protocol": "5"},
    "target": {"url": "mqtt://127.0.0.1:1884", "protocol": "5"},
    "routes": [
        {"source": "devices/+/telemetry", "share_group": "svc-a", "target": "dt/{1}/telemetry"}
    ],
}


def write(tmp_path: Path, cfg: dict[str, Any] | str, name: str = "bridge.yaml") -> Path:
    path = tmp_path / name
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return path


def with_(**changes: Any) -> dict[str, Any]:
    cfg = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        if value is None:
            node.pop(last, None)
        else:
            node[int(last) if last.isdigit() else last] = value
    return cfg


def run_check(capsys: pytest.CaptureFixture[str], *paths: Path) -> tuple[int, str, str]:
    code = main(["check", "--config", *map(str, paths)])
    out, err = capsys.readouterr()
    return code, out, err


def test_valid_config_prints_effective_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_check(capsys, write(tmp_path, BASE))
    assert (code, err) == (0, "")
    shown = yaml.safe_load(out)
    assert shown["routes"][0]["target"] == "dt/{1}/telemetry"
    assert shown["flow"]["max_inflight"] == 1000
    assert shown["shutdown"]["deadline"] == 20.0


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"routes__0__target": "dt/{3}/t"},
            "routes[0].target: capture {3} but the filter has 1 wildcard",
        ),
        (
            {"routes__0__target": "dt/{topic}/{x}"},
            "routes[0].target: unknown placeholder {x}: use {1}, {2}, … or {topic}",
        ),
        (
            {"routes__0__target": "dt/+/t"},
            "routes[0].target: a target topic cannot contain the wildcards '+' or '#'",
        ),
        (
            {"routes__0__source": "devices/#/x"},
            "routes[0].source: '#' must be a whole level and the last one",
        ),
        ({"routes__0__source": "devices/a+/x"}, "routes[0].source: '+' must be a whole level"),
        (
            {"routes__0__qos": 2},
            "routes[0].qos: qos 2 is not supported: the bridge delivers at least once; use 1",
        ),
        (
            {"routes__0__share_group": "a/b"},
            "routes[0].share_group: a share group name is non-empty and has no '/', '+' or '#'",
        ),
        ({"routes__0__colour": "red"}, "routes[0].colour: unknown key"),
        ({"routes": []}, "routes: List should have at least 1 item after validation, not 0"),
        ({"direction": None}, "direction: required"),
        ({"direction": "sideways"}, "direction: must be 'dtb' or 'btd'"),
        (
            {"source__url": "http://x:1"},
            "source.url: scheme must be mqtt:// or mqtts://, got 'http://x:1'",
        ),
        ({"target__url": "mqtt://:1884"}, "target.url: no host in 'mqtt://:1884'"),
        ({"source__protocol": "4"}, "source.protocol: must be '5' or '3.1.1'"),
        (
            {"source__password_file": "/nonexistent/pw"},
            "source.password_file: cannot read /nonexistent/pw: No such file or directory",
        ),
        (
            {"flow": {"max_inflight": 0}},
            "flow.max_inflight: Input should be greater than or equal to 1",
        ),
        ({"http": {"listen": "9100"}}, "http.listen: expected HOST:PORT, got '9100'"),
        ({"instance_id": "a/b"}, "instance_id: must not contain '/', '+', '#' or start with '$'"),
        (
            {"routes__0__device": "{1}", "routes__0__cohort": {"percent": 5}},
            "routes[0].cohort: a cohort needs mode: copy. A takeover route takes its messages "
            "from the legacy consumers' share group, so the devices outside the cohort would "
            "reach no one",
        ),
        (
            {
                "routes__0__mode": "copy",
                "routes__0__share_group": None,
                "routes__0__cohort": {"percent": 5},
            },
            'routes[0].cohort: a cohort needs device: the device key, e.g. device: "{1}"',
        ),
        (
            {
                "routes__0__mode": "copy",
                "routes__0__device": "{1}",
                "routes__0__cohort": {"percent": 150},
            },
            "routes[0].cohort.percent: Input should be less than or equal to 100",
        ),
        (
            {
                "routes__0__mode": "copy",
                "routes__0__device": "{1}",
                "routes__0__cohort": {"percent": 5, "include_file": "/nonexistent/canary.txt"},
            },
            "routes[0].cohort.include_file: cannot read /nonexistent/canary.txt: "
            "No such file or directory",
        ),
        (
            {"routes__0__device": "{2}"},
            "routes[0].device: capture {2} but the filter has 1 wildcard",
        ),
        ({"routes__0__mode": "shadow"}, "routes[0].mode: must be 'takeover' or 'copy'"),
        (
            {"routes": [BASE["routes"][0], {**BASE["routes"][0], "mode": "copy"}]},
            "routes[1].share_group: 'svc-a' is the group of a takeover route (the legacy "
            "consumers'); a copy route needs a plain subscription or a share group only bridge "
            "workers join",
        ),
        (
            {"routes": [BASE["routes"][0], {"source": "devices/#", "mode": "copy"}]},
            "routes[1].source: 'devices/#' overlaps the takeover route routes[0] "
            "('devices/+/telemetry'): a worker cannot tell which subscription a message came "
            "through; run the copy route in workers of its own",
        ),
    ],
)
def test_each_error_is_one_precise_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict[str, Any], expected: str
) -> None:
    path = write(tmp_path, with_(**changes))
    code, out, err = run_check(capsys, path)
    assert code == 2
    assert out == ""
    assert err == f"error: {path}: {expected}\n"


def test_loop_on_one_broker_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = with_(
        target__url="mqtt://127.0.0.1:1883", routes=[{"source": "a/#", "target": "a/copy/{1}"}]
    )
    code, _, err = run_check(capsys, write(tmp_path, cfg))
    assert code == 2
    assert (
        "routes[0].target: 'a/copy/{1}' can match routes[0].source 'a/#' on the same broker" in err
    )


def test_loop_across_dtb_and_btd_is_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dtb = write(
        tmp_path, with_(routes=[{"source": "devices/+/up", "target": "dt/{1}/up"}]), "dtb.yaml"
    )
    btd_cfg = with_(
        direction="btd",
        source__url="mqtt://127.0.0.1:1884",
        target__url="mqtt://127.0.0.1:1883",
        routes=[{"source": "dt/+/#", "target": "devices/{1}/cmd"}],
    )
    btd = write(tmp_path, btd_cfg, "btd.yaml")
    code, _, err = run_check(capsys, dtb, btd)
    assert code == 2
    assert (
        f"{dtb}: routes[0].target: 'dt/{{1}}/up' can match {btd} routes[0].source 'dt/+/#'" in err
    )
    # btd's target devices/{1}/cmd cannot match dtb's devices/+/up: no second line.
    assert err.count("error:") == 1
    safe_btd = write(
        tmp_path,
        {**btd_cfg, "routes": [{"source": "cmd/+", "target": "devices/{1}/cmd"}]},
        "btd2.yaml",
    )
    assert run_check(capsys, dtb, safe_btd)[0] == 0


def test_environment_overrides_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BRIDGE_TARGET__URL", "mqtts://iot.example.com:8883")
    monkeypatch.setenv("BRIDGE_FLOW__MAX_INFLIGHT", "77")
    code, out, _ = run_check(capsys, write(tmp_path, BASE))
    assert code == 0
    shown = yaml.safe_load(out)
    assert shown["target"]["url"] == "mqtts://iot.example.com:8883"
    assert shown["flow"]["max_inflight"] == 77
    monkeypatch.setenv("BRIDGE_FLOW__MAX_INFLIGHT", "lots")
    code, _, err = run_check(capsys, write(tmp_path, BASE))
    assert code == 2
    assert "flow.max_inflight: Input should be a valid integer" in err


def test_instance_id_defaults_to_hostname(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOSTNAME", "dtb-7")
    code, out, _ = run_check(capsys, write(tmp_path, with_(instance_id=None)))
    assert code == 0
    assert yaml.safe_load(out)["instance_id"] == "dtb-7"
    monkeypatch.delenv("HOSTNAME")
    code, _, err = run_check(capsys, write(tmp_path, with_(instance_id=None)))
    assert code == 2
    assert "instance_id: not set, and $HOSTNAME is empty: set instance_id" in err


def test_secret_is_read_from_file_and_never_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2-very-secret\n")
    code, out, err = run_check(
        capsys, write(tmp_path, with_(source__password_file=str(secret), source__username="u"))
    )
    assert code == 0
    assert "hunter2" not in out + err
    # Inline passwords are not a thing: secrets come from files.
    code, out, err = run_check(capsys, write(tmp_path, with_(source__password="hunter2")))
    assert code == 2
    assert "source.password: unknown key" in err
    assert "hunter2" not in err


def test_yaml_syntax_error_names_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "direction: dtb\nsource: [unclosed\n")
    code, _, err = run_check(capsys, path)
    assert code == 2
    assert err.startswith(f"error: {path}: line ")
    assert err.count("\n") == 1


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_check(capsys, tmp_path / "nope.yaml")
    assert code == 2
    assert err == f"error: {tmp_path / 'nope.yaml'}: cannot read: No such file or directory\n"


def test_run_with_bad_config_exits_2_without_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, with_(routes__0__target="x/{2}"))
    proc = subprocess.run(
        [sys.executable, "-m", "bridge", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == "error: routes[0].target: capture {2} but the filter has 1 wildcard\n"


def test_copy_route_with_cohort(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = tmp_path / "canary.txt"
    canary.write_text("dev-1\n")
    route = {
        "source": "devices/+/telemetry",
        "share_group": "mqtt-bridge-shadow",
        "mode": "copy",
        "target": "dt/{1}/telemetry",
        "device": "{1}",
        "cohort": {"percent": 2.5, "include_file": str(canary)},
    }
    # A shadow worker's file: the copy route only (beside a takeover route on the same
    # filter, check refuses it).
    code, out, err = run_check(capsys, write(tmp_path, with_(routes=[route])))
    assert (code, err) == (0, "")
    shown = yaml.safe_load(out)["routes"][0]
    assert shown["mode"] == "copy"
    assert shown["cohort"] == {"percent": 2.5, "include_file": str(canary), "exclude_file": None}
    # Routes are a list: the environment sets them whole, as JSON.
    monkeypatch.setenv("BRIDGE_ROUTES", json.dumps([{**route, "cohort": {"percent": 40}}]))
    code, out, _ = run_check(capsys, write(tmp_path, BASE))
    assert code == 0
    assert yaml.safe_load(out)["routes"][0]["cohort"]["percent"] == 40


def test_sizing_rules_warn_and_strict_makes_them_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = with_(
        target__connections=20,
        target__limits={"inflight": 100},
        flow={"max_inflight": 1000},
        backup={"s3": {"bucket": "b", "mode": "required"}},
    )
    path = write(tmp_path, cfg)
    code, out, err = run_check(capsys, path)
    assert code == 0
    assert out  # still valid: the effective configuration is printed
    assert err.splitlines() == [
        f"warning: {path}: flow.max_inflight 1000 < target.connections 20 × limits.inflight "
        "100 = 2000: the target connections can never all be busy; set flow.max_inflight "
        "to at least 2000",
        f"warning: {path}: backup.s3.mode required with flow.max_inflight 1000 < 2 × 2000 "
        "(the target windows): the archive's batches and the target compete for the same "
        "bound; set flow.max_inflight to at least 4000",
    ]
    assert main(["check", "--strict", "-q", "--config", str(path)]) == 2
    assert capsys.readouterr().err.count("error:") == 2
    cfg["flow"]["max_inflight"] = 4000
    code, _, err = run_check(capsys, write(tmp_path, cfg))
    assert (code, err) == (0, "")


def test_a_binary_password_reaches_the_broker_byte_for_byte(tmp_path: Path) -> None:
    """MQTT passwords are binary data: nothing is decoded (an error would show a byte)."""
    from bridge.config import load_config
    from bridge.wiring import password_of

    secret = b"\xff\x00\xfe-not-utf8-\xc3"
    (tmp_path / "pw").write_bytes(secret + b"\r\n")
    path = write(tmp_path, with_(target__password_file=str(tmp_path / "pw"), target__username="u"))
    assert password_of(load_config(path).target) == secret


def test_max_inflight_grows_with_the_pool_unless_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pool = {"target__connections": 200, "target__limits": {"inflight": 100}}
    code, out, err = run_check(capsys, write(tmp_path, with_(**pool)))
    assert (code, err) == (0, "")  # no sizing warning: the default holds every window
    assert yaml.safe_load(out)["flow"]["max_inflight"] == 20_000
    required = with_(**pool, backup={"s3": {"bucket": "b", "mode": "required"}})
    code, out, err = run_check(capsys, write(tmp_path, required))
    assert (code, err) == (0, "")
    assert yaml.safe_load(out)["flow"]["max_inflight"] == 40_000
    # Capped by what MQTT can announce; set by hand, it stays (and `check` warns).
    huge = with_(target__connections=1000, target__limits={"inflight": 100})
    code, out, _ = run_check(capsys, write(tmp_path, huge))
    assert yaml.safe_load(out)["flow"]["max_inflight"] == 65535
    code, out, err = run_check(capsys, write(tmp_path, with_(**pool, flow={"max_inflight": 500})))
    assert yaml.safe_load(out)["flow"]["max_inflight"] == 500
    assert "can never all be busy" in err
    assert yaml.safe_load(out)["flow"]["qos0_when_full"] == "block"


async def test_every_connection_announces_a_maximum_packet_size(tmp_path: Path) -> None:
    """Every connection reads, so every one bounds what its broker may send: the worker's
    sessions and the bridge's own (probe, heartbeat, registry, `sessions`, retained sync,
    which all derive from clean_session). The latter announced none before."""
    from bridge.config import load_config
    from bridge.wiring import (
        clean_session,
        make_failback,
        make_failover,
        make_target,
        source_session,
    )

    cfg = load_config(write(tmp_path, with_(source__max_packet_size=300_000)))
    limits = {"source": cfg.packet_limit("source"), "target": cfg.packet_limit("target")}
    assert limits["source"] == 300_000
    assert limits["target"] > 0
    for side in ("source", "target"):
        assert clean_session(cfg, side, "x").maximum_packet_size == limits[side]
        failback = make_failback(cfg, make_failover(side, getattr(cfg, side)))
        assert failback.options.maximum_packet_size == limits[side]
    assert source_session(cfg, "s", None).maximum_packet_size == limits["source"]
    pool = make_target(cfg, lambda env, outcome: None)
    assert {link.options.maximum_packet_size for link in pool.links} == {limits["target"]}
