"""Configuration that cannot silently lose a route: duplicate YAML keys, unknown BRIDGE_*
variables, errors that name the variable that caused them, YAML syntax errors in plain
words, and `check` printing the values the worker will really use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bridge.config import BridgeConfig
from bridge.loader import variables
from tests.harness import ROOT
from tests.test_config import BASE, run_check, with_, write

ROUTES_TWICE = """\
instance_id: dtb-0
direction: dtb
source: {url: "mqtt://127.0.0.1:1883"}
target: {url: "mqtt://127.0.0.1:1884"}
routes:
  - source: devices/+/telemetry
    target: dt/{1}/telemetry
flow:
  max_inflight: 500
routes:
  - source: devices/+/status
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.upper().startswith("BRIDGE_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_a_second_routes_block_is_refused_with_both_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, ROUTES_TWICE)
    code, out, err = run_check(capsys, path)
    assert (code, out) == (2, "")
    assert err == (
        f"error: {path}: line 10: duplicate key 'routes' (first at line 5): the second would "
        "silently replace the first; merge them into one\n"
    )


def test_duplicate_keys_inside_a_route_and_every_one_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = ROUTES_TWICE.replace(
        "routes:\n  - source: devices/+/status\n",
        "source: {url: 'mqtt://h:1', url: 'mqtt://h:2'}\n",
    ).replace(
        "    target: dt/{1}/telemetry\n", "    target: dt/{1}/telemetry\n    qos: 0\n    qos: 1\n"
    )
    path = write(tmp_path, text)
    code, _, err = run_check(capsys, path)
    assert code == 2
    assert err.count("\n") == 3, err
    for expected in (
        "line 9: duplicate key 'qos' (first at line 8): ",
        "line 12: duplicate key 'source' (first at line 3): ",
        "line 12: duplicate key 'url' (first at line 12): ",  # in one flow mapping
    ):
        assert f"error: {path}: {expected}" in err


def test_yaml_merge_keys_may_still_be_overridden(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An anchored mapping merged with `<<` and one of its keys overridden: YAML's own
    # way to repeat a key on purpose, which must stay allowed.
    text = yaml.safe_dump(BASE, sort_keys=False) + (
        "shutdown: &base {deadline: 5, quiet: 0.2}\nflow:\n  <<: {max_inflight: 5}\n"
        "  max_inflight: 6\n"
    )
    code, out, err = run_check(capsys, write(tmp_path, text))
    assert (code, err) == (0, "")
    assert yaml.safe_load(out)["flow"]["max_inflight"] == 6


def test_run_refuses_a_duplicate_key_without_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, ROUTES_TWICE)
    proc = subprocess.run(
        [sys.executable, "-m", "bridge", "run", "--config", str(path)],
        capture_output=True, text=True, timeout=30, check=False, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {path}: line 10: duplicate key 'routes'")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("variable", "hint"),
    [
        ("BRIDGE_TARGET_URL", "did you mean BRIDGE_TARGET__URL?"),
        ("BRIDGE_TRAGET__URL", "did you mean BRIDGE_TARGET__URL?"),
        ("BRIDGE_FLOW__MAX_INFLIGTH", "did you mean BRIDGE_FLOW__MAX_INFLIGHT?"),
        ("BRIDGE_ROUTES__0__QOS", "BRIDGE_ROUTES is set whole (as JSON), not key by key"),
        ("BRIDGE_ZZZ", "sections nest with '__', e.g. BRIDGE_TARGET__URL"),
    ],
)
def test_an_unknown_bridge_variable_is_an_error_with_a_near_match(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    clean_env: pytest.MonkeyPatch,
    variable: str,
    hint: str,
) -> None:
    clean_env.setenv(variable, "mqtt://127.0.0.1:9999")
    code, out, err = run_check(capsys, write(tmp_path, BASE))
    assert (code, out) == (2, "")
    assert err == f"error: environment {variable}: no such setting; {hint}\n"


def test_valid_variables_in_any_case_are_accepted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("bridge_flow__max_inflight", "55")
    clean_env.setenv("BRIDGE_SOURCE__LIMITS__CONNECT_INTERVAL", "0.5")
    clean_env.setenv("BRIDGE_LOG", '{"level": "debug"}')
    code, out, err = run_check(capsys, write(tmp_path, BASE))
    assert (code, err) == (0, "")
    shown = yaml.safe_load(out)
    assert shown["flow"]["max_inflight"] == 55
    assert shown["source"]["limits"]["connect_interval"] == 0.5
    assert shown["log"]["level"] == "debug"
    # `check` says which values the environment set.
    assert "# set by the environment: BRIDGE_LOG, BRIDGE_SOURCE__LIMITS__CONNECT_INTERVAL, " in out


def test_every_setting_has_its_variable() -> None:
    names, _ = variables(BridgeConfig)
    for expected in (
        "BRIDGE_INSTANCE_ID", "BRIDGE_ROUTES", "BRIDGE_TARGET__URL", "BRIDGE_TARGET__CONNECTIONS",
        "BRIDGE_SOURCE__TLS__CA_FILE", "BRIDGE_TARGET__LIMITS__PUBLISH_RATE",
        "BRIDGE_BACKUP__S3__MODE", "BRIDGE_HTTP__LISTEN", "BRIDGE_SHUTDOWN__DEADLINE",
    ):  # fmt: skip
        assert expected in names
    assert not [n for n in names if n.startswith("BRIDGE_ROUTES__")]


def test_a_bad_value_from_a_variable_names_the_variable_not_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("BRIDGE_FLOW__MAX_INFLIGHT", "lots")
    path = write(tmp_path, BASE)
    code, _, err = run_check(capsys, path)
    assert code == 2
    assert err == (
        "error: environment BRIDGE_FLOW__MAX_INFLIGHT: flow.max_inflight: Input should be a "
        "valid integer, unable to parse string as an integer\n"
    )
    # The same variable under two files is one problem, not two.
    code, _, err = run_check(capsys, path, write(tmp_path, BASE, "other.yaml"))
    assert err.count("error:") == 1


def test_a_section_problem_names_the_variables_inside_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("BRIDGE_SOURCE__USERNAME", "u")
    clean_env.setenv("BRIDGE_SOURCE__PROTOCOL", "3.1.1")
    secret = write(tmp_path, "pw\n", "pw")
    cfg = with_(source__password_file=str(secret))
    clean_env.delenv("BRIDGE_SOURCE__USERNAME")
    code, _, err = run_check(capsys, write(tmp_path, cfg))
    assert code == 2
    assert err.endswith(
        "source: password_file needs username with MQTT 3.1.1 (MQTT-3.1.2-22) "
        "(with BRIDGE_SOURCE__PROTOCOL from the environment)\n"
    )


@pytest.mark.parametrize(
    ("text", "where", "plain"),
    [
        ("direction: dtb\nsource: [unclosed\n", "line 2, column 9", "a '[' list is not closed"),
        ("direction: dtb\nsource:\n  url: a: b\n", "line 3, column 9", "quote a value that"),
        ("direction: dtb\nsource:\n\turl: x\n", "line 3, column 1", "a tab character"),
        ("a: 1\nsource:\n    url: x\n  protocol: 5\n", "line 4, column 3", "indentation"),
        ('direction: "dtb\nsource: x\n', "line 1, column 12", "a quote is opened and never"),
        ("a: 1\nb\nc: 2\n", "line 2, column 1", "a ':' is missing"),
        ("routes:\n  - source: a\n  source: b\n", "line 3, column 3", "with '-' at the same"),
    ],
)
def test_a_yaml_syntax_error_says_what_is_wrong_in_plain_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, where: str, plain: str
) -> None:
    path = write(tmp_path, text)
    code, _, err = run_check(capsys, path)
    assert code == 2
    assert err.startswith(f"error: {path}: {where}: "), err
    assert plain in err
    assert "(YAML: " in err  # the parser's own words stay beside the explanation
    assert err.count("\n") == 1


def test_check_prints_the_effective_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], secret_pems: dict[str, Path]
) -> None:
    cfg = with_(
        target__url="mqtts://iot.example.com:8883",
        target__profile="aws-iot",
        target__connections=3,
        target__limits={"publish_rate": 50},
        target__tls={"ca_file": str(secret_pems["ca"])},
    )
    path = write(tmp_path, cfg)
    code, out, err = run_check(capsys, path)
    assert (code, err) == (0, "")
    assert "# source client ids (1): dtb-0-src\n" in out
    assert "# target client ids (3): dtb-0-tgt-0, dtb-0-tgt-1, dtb-0-tgt-2\n" in out
    shown = yaml.safe_load(out)
    assert shown["source"]["client_id"] == "dtb-0-src"
    assert shown["target"]["client_id"] == "dtb-0-tgt"
    assert shown["routes"][0]["name"] == "devices/+/telemetry"
    limits = shown["target"]["limits"]
    # The aws-iot presets, with the key set in the file winning over its preset.
    assert limits["publish_rate"] == 50
    assert (limits["inflight"], limits["max_payload"], limits["max_topic_slashes"]) == (
        100,
        131072,
        7,
    )
    # What `check` prints is itself a configuration that gives the same worker.
    again = write(tmp_path, out, "effective.yaml")
    code, out_again, _ = run_check(capsys, again)
    assert code == 0
    assert yaml.safe_load(out_again) == shown


@pytest.fixture
def secret_pems(tmp_path: Path) -> dict[str, Path]:
    import trustme

    ca = trustme.CA()
    path = tmp_path / "ca.pem"
    path.write_bytes(ca.cert_pem.bytes())
    return {"ca": path}
