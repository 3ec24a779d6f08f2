"""The bad-input corpus (tests/bad_inputs/): every case states its one line and exit code.

configs, environment: `check` in-process; startup: `run` as a process (check passes);
cli: the command line as a process; archive: objects in a real S3 API (moto), replayed
into a real Mosquitto; replay: S3 and targets that keep failing; peers: fake brokers
that break MQTT against a worker run as a process. Every case carries the secret marker
(password files, URLs, environment values, archived records), and no output may hold it.
The configuration loader is also fuzzed (Hypothesis): never a traceback, never a secret.
"""

from __future__ import annotations

import atexit
import base64
import copy
import gzip
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge import mqtt_codec as codec
from bridge.cli import main
from bridge.config import BridgeConfig, load_config
from bridge.errors import ConfigError
from tests.conftest import S3, Rig
from tests.fakes import FakeSource, FakeTarget, publish_packet
from tests.harness import ROOT, Collector, Mosquitto, Worker, bridge_config, free_port, wait_until

CORPUS = Path(__file__).parent / "bad_inputs"
SECRET = "S3CR3T-MARK-7f3a9c"

BASE: dict[str, Any] = {
    "instance_id": "dtb-0",
    "direction": "dtb",
    "source": {
        "url": "mqtt://127.0.0.1:1883",
        "username": "bridge",
        "password_file": "{dir}/source-password",
    },
    "target": {
        "url": "mqtt://127.0.0.1:1884",
        "username": "bridge",
        "password_file": "{dir}/target-password",
    },
    "routes": [{"source": "devices/+/telemetry", "target": "dt/{1}/telemetry"}],
}


def corpus(kind: str) -> list[Any]:
    cases = yaml.safe_load((CORPUS / f"{kind}.yaml").read_text())
    return [pytest.param(case, id=case["name"]) for case in cases]


def fill(value: Any, ctx: dict[str, str]) -> Any:
    """Placeholders filled in, and {repeat: S, times: N} expanded, all the way down."""
    if isinstance(value, str):
        for key, text in ctx.items():
            value = value.replace(key, text)
        return value
    if isinstance(value, dict):
        if set(value) == {"repeat", "times"}:
            return fill(value["repeat"], ctx) * value["times"]
        return {k: fill(v, ctx) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, ctx) for v in value]
    return value


def apply(cfg: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    for dotted, value in changes.items():
        node: Any = cfg
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
        index: Any = int(last) if last.isdigit() else last
        if value is None:
            node.pop(index, None)
        else:
            node[index] = value
    return cfg


def encrypted_key(directory: Path) -> None:
    """A client certificate whose private key is encrypted with a passphrase."""
    import trustme
    from cryptography.hazmat.primitives import serialization

    cert = trustme.CA().issue_cert("bridge")
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), password=None)
    (directory / "client.pem").write_bytes(cert.cert_chain_pems[0].bytes())
    (directory / "encrypted.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )


def prepare(case: dict[str, Any], directory: Path, port: int = 0) -> tuple[Path, dict[str, str]]:
    """Write the case's files and config; returns the config path and the placeholders."""
    config = directory / "bridge.yaml"
    ctx = {
        "{secret}": SECRET,
        "{dir}": str(directory),
        "{config}": str(config),
        "{port}": str(port),
    }
    for side in ("source", "target"):
        (directory / f"{side}-password").write_text(SECRET + "\n")
    for name, spec in (case.get("files") or {}).items():
        data = spec if isinstance(spec, str) else spec.get("bytes_b64")
        if isinstance(spec, dict) and "bytes_b64" in spec:
            (directory / name).write_bytes(base64.b64decode(spec["bytes_b64"]))
        else:
            (directory / name).write_text(fill(data if data is not None else spec, ctx))
    for maker in case.get("make") or []:
        {"encrypted_key": encrypted_key}[maker](directory)
    if "text" in case:
        config.write_text(fill(case["text"], ctx))
    elif "bytes_b64" in case:
        config.write_bytes(base64.b64decode(case["bytes_b64"]))
    else:
        cfg = apply(fill(copy.deepcopy(BASE), ctx), fill(case.get("set") or {}, ctx))
        config.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return config, ctx


def assert_no_secret(*outputs: str) -> None:
    for output in outputs:
        assert SECRET not in output, "the secret marker leaked"
        # Nor any long piece of it (a truncated or split echo).
        assert SECRET[:8] not in output
        assert SECRET[-8:] not in output


# ---- configuration files and environment overrides: `check` ------------------------------


@pytest.mark.parametrize("case", corpus("configs") + corpus("environment"))
def test_config_case_is_one_line(
    case: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config, ctx = prepare(case, tmp_path)
    for name, value in (case.get("env") or {}).items():
        monkeypatch.setenv(name, fill(value, ctx))
    code = main(["check", "--config", str(config)])
    out, err = capsys.readouterr()
    assert_no_secret(out, err)
    assert code == case.get("exit", 2), err
    if code == 2:
        assert out == ""
        assert err == f"error: {fill(case['expect'], ctx)}\n"
    else:
        assert err == ""
        assert out.startswith(f"# {config}: ok")


# ---- what only the start can find out: `run` ---------------------------------------------


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _process(
    args: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("case", corpus("startup"))
def test_startup_case_is_one_line_and_exit_2(
    case: dict[str, Any], tmp_path: Path, busy_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    config, ctx = prepare(case, tmp_path, busy_port if case.get("busy_port") else 0)
    assert main(["check", "--config", str(config), "-q"]) == case["check_exit"]
    assert capsys.readouterr().err == ""
    done = _process(["run", "--config", str(config)])
    assert_no_secret(done.stdout, done.stderr)
    assert done.returncode == case.get("exit", 2), done.stderr
    assert error_lines(done.stderr) == [f"error: {fill(case['expect'], ctx)}"]
    assert done.stderr.endswith(f"error: {fill(case['expect'], ctx)}\n")


# ---- the command line ------------------------------------------------------------------


@pytest.mark.parametrize("case", corpus("cli"))
def test_cli_case_is_one_line_and_exit_2(case: dict[str, Any], tmp_path: Path) -> None:
    _, ctx = prepare(case, tmp_path)
    done = _process(fill(case["args"], ctx))
    assert_no_secret(done.stdout, done.stderr)
    assert done.returncode == case.get("exit", 2)
    assert done.stdout == ""
    assert done.stderr == f"error: {fill(case['expect'], ctx)}\n"


# ---- archive objects: replay skips and reports, publishes the rest -----------------------


def archived_record(case: str, n: int, changes: dict[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {
        "topic": f"a/{case}", "target_topic": f"out/{case}",
        "payload_b64": base64.b64encode(f"{case}|{n}|".encode()).decode(), "qos": 1,
        "retain": False, "properties": {}, "received_at": 1795315200.0 + n,
        "direction": "dtb", "instance": "w-0", "route": "a/+",
    }  # fmt: skip
    return {k: v for k, v in {**record, **changes}.items() if v is not None}


def archive_object(case: dict[str, Any]) -> tuple[bytes, set[bytes]]:
    """The object's bytes and the payloads of its valid records."""
    name = case["name"]
    if "raw" in case:
        return case["raw"].encode(), set()
    if "zeros" in case:
        return gzip.compress(bytes(case["zeros"]), 9), set()
    if "noise" in case:
        return random.Random(case["name"]).randbytes(case["noise"]), set()
    lines, good = [], set()
    for n, line in enumerate(fill(case["lines"], {"{secret}": SECRET})):
        if isinstance(line, str):
            lines.append(line.encode())
            continue
        record = archived_record(name, n, line["record"])
        lines.append(json.dumps(record).encode())
        if not line["record"]:
            good.add(f"{name}|{n}|".encode())
    members = case.get("members", 1)
    step = -(-len(lines) // members)
    body = b"".join(
        gzip.compress(b"".join(line + b"\n" for line in lines[i : i + step]))
        for i in range(0, len(lines), step)
    )
    return body[: len(body) - case.get("cut", 0)], good


def replay_config(tmp: Path, s3: S3, target_url: str) -> Path:
    (tmp / "target-password").write_text(SECRET + "\n")
    cfg = bridge_config("mqtt://127.0.0.1:1", target_url, [{"source": "a/+"}])
    cfg["target"]["username"] = "bridge"
    cfg["target"]["password_file"] = str(tmp / "target-password")
    cfg["backup"] = {"s3": {"bucket": s3.bucket, "endpoint_url": s3.url, "region": "us-east-1"}}
    path = tmp / "replay.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_archive_corpus_is_skipped_and_reported_and_the_rest_replayed(
    tmp_path: Path, s3: S3
) -> None:
    cases = [p.values[0] for p in corpus("archive")]
    expected_payloads: set[bytes] = set()
    details, bad, errors = [], 0, 0
    for i, case in enumerate(cases):
        key = "arch/" + case.get(
            "key", f"dtb/dt=2026-11-22/hour=10/w-0-{1795312800000 + i}-{i:06d}.jsonl.gz"
        )
        body, good = archive_object(case)
        assert len(good) == case["published"] or case["published"] == 0, case["name"]
        if case["published"]:
            expected_payloads |= good
        s3.client.put_object(Bucket=s3.bucket, Key=key, Body=body)
        for line in case["expect"]:
            details.append(f"  {key}{line}")
            bad += line.startswith(" line ")
            errors += not line.startswith(" line ")
    with Mosquitto(tmp_path, "fresh") as fresh, Collector(fresh.url, "out/#") as collector:
        done = _process([
            "replay", "--config", str(replay_config(tmp_path, s3, fresh.url)),
            "--from", f"s3://{s3.bucket}/arch/",
            "--max-record-bytes", "65536", "--max-object-bytes", "8388608",
        ])  # fmt: skip
        collector.wait_for(len(expected_payloads), 30, stall=3)
    assert_no_secret(done.stdout, done.stderr)
    assert done.returncode == 1, done.stderr  # something was skipped: not a clean run
    assert error_lines(done.stderr) == []
    lines = done.stdout.splitlines()
    assert f"published: {len(expected_payloads)}" in lines
    assert f"bad:       {bad}   (unreadable or invalid records, skipped)" in lines
    assert f"errors:    {errors}   (corrupt objects and bad keys, skipped)" in lines
    for detail in details:
        assert detail in lines, done.stdout
    assert {m.payload for m in collector.messages} == expected_payloads
    assert len(collector.messages) == len(expected_payloads)


# ---- replay against S3 and targets that keep failing -------------------------------------


@pytest.mark.parametrize("case", corpus("replay"))
def test_replay_gives_up_with_one_line_and_a_summary(
    case: dict[str, Any], tmp_path: Path, s3: S3
) -> None:
    body = gzip.compress(json.dumps(archived_record("ok", 0, {})).encode() + b"\n")
    s3.client.put_object(Bucket=s3.bucket, Key="arch/dtb/dt=2026-11-22/hour=10/w-0-1-0.jsonl.gz",
                         Body=body)  # fmt: skip
    closed = free_port()
    bucket = "no-such-bucket" if case.get("s3") == "missing_bucket" else s3.bucket
    with Mosquitto(tmp_path, "target", extra="allow_anonymous false") as locked:
        target = {"refuses_auth": locked.url, "down": f"mqtt://127.0.0.1:{closed}"}.get(
            case.get("target", ""), locked.url
        )
        config = replay_config(tmp_path, s3, target)
        if case.get("s3") == "down":
            cfg = yaml.safe_load(config.read_text())
            cfg["backup"]["s3"]["endpoint_url"] = f"http://127.0.0.1:{closed}"
            config.write_text(yaml.safe_dump(cfg))
        args = ["replay", "--config", str(config), "--from", f"s3://{bucket}/arch/"]
        done = _process(args)
    ctx = {"{bucket}": bucket, "{port}": str(closed)}
    assert_no_secret(done.stdout, done.stderr)
    assert done.returncode == 2, done.stderr
    [line] = error_lines(done.stderr)
    if "expect" in case:
        assert line == f"error: {fill(case['expect'], ctx)}"
    else:
        assert line.startswith(f"error: {fill(case['expect_start'], ctx)}"), line
    assert done.stdout.startswith("objects:")  # the summary, always
    assert f"stopped early: {line.removeprefix('error: replay: ')}" in done.stdout


# ---- peers that break the protocol -------------------------------------------------------


def _readiness(worker: Worker) -> dict[str, Any]:
    try:
        url = f"http://127.0.0.1:{worker.http_port}/readyz"
        with urllib.request.urlopen(url, timeout=2) as r:
            return dict(json.loads(r.read()))
    except urllib.error.HTTPError as exc:
        return dict(json.loads(exc.read()))
    except OSError:
        return {}


def _matches(value: float, want: Any) -> bool:
    if isinstance(want, str) and want.startswith(">="):
        return value >= float(want[2:])
    return value == float(want)


@pytest.mark.parametrize("case", corpus("peers"))
def test_peer_that_breaks_the_protocol_gets_a_protocol_answer(
    case: dict[str, Any], rig: Rig
) -> None:
    expect = case["expect"]
    names = {"maximum_qos": codec.MAXIMUM_QOS, "receive_maximum": codec.RECEIVE_MAXIMUM}
    target_spec, source_spec = case.get("target"), case.get("source")
    fake_target = FakeTarget(
        receive_maximum=(target_spec or {}).get("receive_maximum", 100),
        connack={names[k]: v for k, v in ((target_spec or {}).get("connack") or {}).items()},
    )
    script = [
        publish_packet(
            p["topic"].encode(),
            f"dev|{i}|".encode().ljust(p.get("size", 0), b"x"),
            i + 1,
            {codec.TOPIC_ALIAS: p["alias"]} if "alias" in p else None,
        )
        for i, p in enumerate((source_spec or {}).get("publish", []))
    ]
    fake_source = FakeSource(script)
    with fake_target, fake_source, Collector(rig.target.url, "dev/#") as collector:
        routes = [{"source": "dev/#", "qos": case.get("route_qos", 1)}]
        worker = rig.worker(
            routes, target_url=fake_target.url if target_spec else None, start=False
        )
        if source_spec:
            worker.cfg["source"]["url"] = fake_source.url
        for side in ("source", "target"):
            (rig.tmp / f"{side}-password").write_text(SECRET + "\n")
            worker.cfg[side].update(
                username="bridge", password_file=str(rig.tmp / f"{side}-password")
            )
        # A scripted peer plays one connection: the bridge's own extra connections (the
        # member registry, the heartbeat) would meet a broker that cannot answer them.
        worker.cfg["membership"] = {"enabled": False}
        worker.cfg["heartbeat"] = {"enabled": False}
        worker.cfg = apply(worker.cfg, case.get("set") or {})
        worker.config_path.write_text(yaml.safe_dump(worker.cfg))
        worker.start(wait_ready=False)

        def settled() -> bool:
            state = _readiness(worker)
            if not state or state["ready"] != expect.get("ready", state["ready"]):
                return False
            if "problem" in expect and expect["problem"] not in state["problems"]:
                return False
            if len(fake_source.pubacks) < expect.get("pubacks", 0):
                return False
            if "disconnect" in expect and expect["disconnect"] not in fake_source.disconnects:
                return False
            metrics = worker.metrics()
            return all(_matches(metrics.get(k, 0), v) for k, v in expect.get("metrics", {}).items())

        wait_until(settled, 30, what=f"{case['name']}: {expect}")
        if "delivered" in expect:
            collector.wait_for(expect["delivered"], 10, stall=2)
            time.sleep(0.5)
            assert len(collector.messages) == expect["delivered"]
        if "announced_max_packet" in expect:
            connect = fake_source.connects[0]
            props, _ = codec.decode_properties(connect, 10)
            assert props is not None
            assert props[codec.MAXIMUM_PACKET_SIZE] == expect["announced_max_packet"]
        if "pubacks" in expect:
            assert sorted(fake_source.pubacks) == list(range(1, expect["pubacks"] + 1))
        worker.stop()
    assert_no_secret(worker.log_tail(10**7))


# ---- the corpus as a whole ---------------------------------------------------------------


def test_corpus_size() -> None:
    """The corpus and its categories, as the issue's note reports them."""
    kinds = ("configs", "environment", "startup", "cli", "archive", "replay", "peers")
    sizes = {kind: len(corpus(kind)) for kind in kinds}
    print("bad-input corpus:", sum(sizes.values()), sizes)
    assert all(sizes.values())
    names = [p.values[0]["name"] for kind in sizes for p in corpus(kind)]
    assert len(names) == len(set(names)), "case names are unique"


# ---- fuzzing the configuration loader ----------------------------------------------------

_FUZZ_DIR = Path(tempfile.mkdtemp(prefix="bridge-fuzz-"))
atexit.register(shutil.rmtree, _FUZZ_DIR, True)
for _side in ("source", "target"):
    (_FUZZ_DIR / f"{_side}-password").write_text(SECRET + "\n")
_VALID = yaml.safe_dump(fill(copy.deepcopy(BASE), {"{dir}": str(_FUZZ_DIR)}))
_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _load_never_crashes(data: bytes, env: dict[str, str] | None = None) -> None:
    path = _FUZZ_DIR / "fuzz.yaml"
    path.write_bytes(data)
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    problems: list[str] = []
    try:
        load_config(path)
    except ConfigError as exc:
        problems = exc.problems
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    for problem in problems:
        assert problem, problems
        assert "\n" not in problem, problems
        assert_no_secret(problem)


_NOISE = st.lists(st.sampled_from([*":[]{}-#&*!|>'\"%@`,?\n\t \x00\\éx1.", "mqtt://"])).map("".join)
# Secrets go where secrets go: the userinfo of a URL that is wrong in some other way too.
_URL_WITH_SECRET = st.builds(
    lambda scheme, user, rest: f"{scheme}{user}:{SECRET}@{rest}",
    st.sampled_from(["mqtt://", "mqtts://", "http://", "https://", "", "mqtt:/", "s3://"]),
    st.sampled_from(["", "u", "AKIA/x"]),
    st.lists(st.sampled_from([*"h:0123[]/?#@. %\n", "9999999"]), max_size=12).map("".join),
)


@_FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, len(_VALID)), st.integers(0, 8), _NOISE), max_size=4)
)
def test_fuzz_config_text(edits: list[tuple[int, int, str]]) -> None:
    text = _VALID
    for pos, cut, noise in edits:
        text = text[:pos] + noise + text[pos + cut :]
    _load_never_crashes(text.encode("utf-8", "surrogatepass"))


@_FUZZ
@given(data=st.binary(max_size=200))
def test_fuzz_config_bytes(data: bytes) -> None:
    _load_never_crashes(data)


_LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
)  # fmt: skip
_VALUE = st.recursive(_LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=12), inner, max_size=3), max_leaves=8)  # fmt: skip
_PATHS = [
    "instance_id", "direction", "source.url", "source.protocol", "source.keepalive",
    "source.client_id", "source.username", "source.password_file", "source.connect_timeout",
    "source.max_packet_size", "source.tls", "source.tls.alpn", "source.limits",
    "source.limits.inflight", "source.profile", "target.url", "target.connections",
    "target.limits.publish_rate", "target.limits.burst", "routes", "routes.0",
    "routes.0.source", "routes.0.target", "routes.0.qos", "routes.0.share_group", "flow",
    "flow.max_inflight", "shutdown", "shutdown.deadline", "http.listen", "log.level",
    "backup", "backup.s3", "backup.s3.endpoint_url", "backup.s3.region", "backup.s3.bucket",
]  # fmt: skip


def _value_for(path: str) -> st.SearchStrategy[Any]:
    """Any value; a URL key also gets URLs with the secret in their userinfo (the marker
    goes only where a secret may be, so any echo of it is a leak)."""
    return st.one_of(_VALUE, _URL_WITH_SECRET) if path.endswith("url") else _VALUE


_CHANGE = st.sampled_from(_PATHS).flatmap(lambda p: st.tuples(st.just(p), _value_for(p)))


@_FUZZ
@given(changes=st.lists(_CHANGE, max_size=3).map(dict))
def test_fuzz_config_values(changes: dict[str, Any]) -> None:
    cfg = yaml.safe_load(_VALID)
    try:
        apply(cfg, changes)
    except (TypeError, KeyError, IndexError, AttributeError):
        return  # the path runs through a value that is no longer a mapping or list
    _load_never_crashes(yaml.safe_dump(cfg, allow_unicode=True).encode())


@_FUZZ
@given(changes=st.lists(_CHANGE, max_size=3).map(dict), as_json=st.lists(st.booleans()))
def test_fuzz_environment(changes: dict[str, Any], as_json: list[bool]) -> None:
    env = {
        "BRIDGE_" + path.upper().replace(".", "__"): (
            json.dumps(value) if not isinstance(value, str) or (as_json[i:i + 1] == [True])
            else value
        ).replace("\x00", "")  # the OS refuses NUL in the environment
        for i, (path, value) in enumerate(changes.items())
    }  # fmt: skip
    _load_never_crashes(_VALID.encode(), env)


def test_fuzzed_base_is_valid() -> None:
    """The fuzzers start from a valid config: otherwise they would test one error only."""
    assert isinstance(load_config(_write_valid()), BridgeConfig)


def _write_valid() -> Path:
    path = _FUZZ_DIR / "valid.yaml"
    path.write_text(_VALID)
    return path


def test_the_secret_check_can_fail() -> None:
    """An error line of the old kind (the URL echoed whole) would have been caught."""
    with pytest.raises(AssertionError):
        assert_no_secret(f"source.url: bad port in 'mqtt://u:{SECRET}@h:99999'")
