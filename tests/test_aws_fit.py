"""AWS IoT Core fit: paced connection pool, limits before publishing, reason codes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from bridge.cli import main
from tests.conftest import Rig
from tests.fakes import CountingProxy, FakeTarget, max_in_window
from tests.harness import Collector, Mosquitto, Publisher, Worker, bridge_config, check, wait_until

# The fake target routes nothing back, so a heartbeat could never cross it; and its
# scripted answers count every PUBLISH.
NO_HEARTBEAT = {"enabled": False}


def test_four_paced_connections_never_exceed_their_rate_and_keep_topic_order(rig: Rig) -> None:
    rate, burst = 100, 0.1
    with CountingProxy(rig.target.port, rig.tmp) as proxy:
        cfg = bridge_config(
            rig.source.url,
            proxy.url,
            [{"source": f"{rig.prefix}/#", "target": "out/{1}"}],
            target={
                "connections": 4,
                "limits": {"publish_rate": rate, "burst": burst, "inflight": 100},
            },
            heartbeat={"enabled": False},  # the proxy counts every PUBLISH: traffic only
        )
        rig.workers.append(Worker(rig.tmp, cfg).start())
        topics = [f"{rig.prefix}/dev{i}" for i in range(16)]
        with (
            Collector(rig.target.url, "out/#") as collector,
            Publisher(rig.source.url) as pub,
        ):
            pub.publish_numbered(topics, 2000)
            pub.wait_acked()
            collector.wait_for(2000, 60)
            report = check(pub.acked(), collector.messages, lambda t: "out/" + t.split("/", 1)[1])
    assert report.lost == 0, report
    assert report.out_of_order == 0, report
    per_client = {cid: times for cid, times in proxy.publishes.items() if times}
    assert sorted(per_client) == [f"w-0-tgt-{i}" for i in range(4)]
    assert sum(map(len, per_client.values())) == 2000 + report.duplicated
    for cid, times in per_client.items():
        peak = max_in_window(times)
        # The bucket allows rate x (1 + burst) in any 1 s window (110 here; unpaced would be
        # ~500). The proxy sees arrivals, not sends: a few ms of jitter can carry a
        # message across a window edge, hence 3 messages of measurement slack.
        assert peak <= rate * (1 + burst) + 3, (cid, peak)
        assert len(times) >= 200  # the hash spread the topics over every connection


def test_oversize_payload_and_deep_topic_are_dead_lettered_mid_stream(rig: Rig) -> None:
    with Mosquitto(rig.tmp, "cloud-like", extra="message_size_limit 131072") as target:
        cfg = bridge_config(
            rig.source.url,
            target.url,
            [{"source": f"{rig.prefix}/#", "target": "dt/{1}"}],
            target={
                "limits": {"max_payload": 131072, "max_topic_slashes": 7, "max_topic_bytes": 256}
            },
        )
        worker = Worker(rig.tmp, cfg)
        rig.workers.append(worker.start())
        ok, deep = f"{rig.prefix}/a/b", f"{rig.prefix}/1/2/3/4/5/6/7/8"
        with Collector(target.url, "dt/#") as collector, Publisher(rig.source.url) as pub:
            pub.publish_numbered([ok], 100)
            pub.publish(ok, 100, size=140 * 1024)  # over 128 KB
            pub.publish(deep, 0)  # dt/1/2/3/4/5/6/7/8: 8 slashes
            for n in range(101, 201):
                pub.publish(ok, n)
            pub.wait_acked()
            collector.wait_for(200, 30)
            time.sleep(0.3)
            acked = pub.acked()
            report = check(
                acked,
                collector.messages,
                lambda t: "dt/" + t.split("/", 1)[1],
                [(ok, 100), (deep, 0)],
            )
    assert report.lost == 0, report
    assert report.unexpected == 0
    assert report.out_of_order == 0
    assert report.delivered == 200
    m = worker.metrics()
    route = f"{rig.prefix}/#"
    assert m[f"dead_lettered{{reason=payload_too_large,route={route}}}"] == 1
    assert m[f"dead_lettered{{reason=topic_too_deep,route={route}}}"] == 1
    assert m["acknowledged"] == 202
    log = worker.log_tail(100_000)
    assert "payload_too_large: 143360 bytes > 131072" in log
    assert "topic_too_deep: 8 slashes > 7" in log


def test_quota_exceeded_slows_the_connection_and_retries(rig: Rig) -> None:
    # Every 10th publish of the first 200 is refused with 0x97 (quota exceeded).
    def decide(n: int, topic: str, payload: bytes) -> int:
        return 0x97 if n < 200 and n % 10 == 9 else 0

    with FakeTarget(decide) as fake:
        cfg = bridge_config(
            rig.source.url,
            fake.url,
            [{"source": f"{rig.prefix}/#"}],
            target={"limits": {"publish_rate": 400, "burst": 0.1}},
            heartbeat=NO_HEARTBEAT,
        )
        worker = Worker(rig.tmp, cfg)
        rig.workers.append(worker.start())
        with Publisher(rig.source.url) as pub:
            pub.publish_numbered([f"{rig.prefix}/a", f"{rig.prefix}/b"], 400)
            pub.wait_acked()
        wait_until(lambda: len(fake.accepted) >= 400, 60, what="all accepted by the fake target")
        m = worker.metrics()
    assert fake.answers.count(0x97) == 20
    delivered = {
        payload.split(b"|")[0] + b"|" + payload.split(b"|")[1] for _, payload in fake.accepted
    }
    assert len(delivered) == 400  # every refused message was sent again and accepted
    assert m["throttled{connection=0,reason=quota_exceeded}"] == 20
    assert m["dead_lettered"] == 0
    assert m["acknowledged"] == 400
    assert 0 < m["connection_rate_limit_messages_per_second{connection=0}"] <= 400
    assert '"event":"target.throttled"' in worker.log_tail(100_000)


@pytest.mark.parametrize(
    ("reason", "event"), [(0x8E, "target.session_taken_over"), (0x93, "target.window_shrunk")]
)
def test_disconnect_reasons_alarm_and_reconnect(rig: Rig, reason: int, event: str) -> None:
    def decide(n: int, topic: str, payload: bytes) -> int | tuple[str, int]:
        return ("disconnect", reason) if n == 50 else 0

    with FakeTarget(decide, receive_maximum=64) as fake:
        cfg = bridge_config(
            rig.source.url,
            fake.url,
            [{"source": f"{rig.prefix}/#"}],
            instance_id="dtb-3",
            heartbeat=NO_HEARTBEAT,
        )
        worker = Worker(rig.tmp, cfg)
        rig.workers.append(worker.start())
        with Publisher(rig.source.url) as pub:
            pub.publish_numbered([f"{rig.prefix}/a"], 200)
            pub.wait_acked()
        wait_until(lambda: len({p for _, p in fake.accepted}) >= 200, 60, what="all accepted")
        m = worker.metrics()
        log = worker.log_tail(100_000)
    assert len(fake.connects) >= 2  # it came back
    assert set(fake.connects) == {"dtb-3-tgt-0"}
    name = {0x8E: "session_taken_over", 0x93: "receive_maximum_exceeded"}[reason]
    assert m[f"disconnects{{connection=0,reason={name}}}"] == 1
    assert f'"event":"{event}"' in log
    if reason == 0x8E:
        assert '"client_id":"dtb-3-tgt-0"' in log
    else:
        assert m["connection_window{connection=0}"] <= 32
    assert m["reconnects{connection=0,side=target}"] >= 1


def test_aws_iot_profile_presets_and_overrides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = {
        "instance_id": "btd-0",
        "direction": "btd",
        "source": {
            "url": "mqtts://example-ats.iot.eu-west-1.amazonaws.com:8883",
            "profile": "aws-iot",
        },
        "target": {
            "url": "mqtts://example-ats.iot.eu-west-1.amazonaws.com:8883",
            "profile": "aws-iot",
            "limits": {"publish_rate": 50},
        },
        "routes": [{"source": f"cmd/{i}/+", "target": f"devices/{i}/{{1}}"} for i in range(60)],
    }
    path = tmp_path / "btd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["check", "--config", str(path)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    limits = shown["target"]["limits"]
    assert limits["publish_rate"] == 50  # overridden
    assert limits["bytes_rate"] == 512 * 1024
    assert limits["inflight"] == 100
    assert limits["max_payload"] == 128 * 1024
    assert limits["max_topic_slashes"] == 7
    assert shown["source"]["limits"]["subscriptions_per_connection"] == 50

    bad = {**cfg, "target": {**cfg["target"], "keepalive": 10}}
    path.write_text(yaml.safe_dump(bad))
    assert main(["check", "--config", str(path)]) == 2
    assert "target: keepalive 10: AWS IoT Core accepts 30–1200 s" in capsys.readouterr().err
    plain = {**cfg, "target": {**cfg["target"], "url": "mqtt://example:1883"}}
    path.write_text(yaml.safe_dump(plain))
    assert main(["check", "--config", str(path)]) == 2
    assert "profile aws-iot needs an mqtts:// url" in capsys.readouterr().err


def test_deploy_examples_pass_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("dtb-0")
    paths = {
        "/etc/mqtt-bridge/tls/AmazonRootCA1.pem": tmp_path / "ca.pem",
        "/etc/mqtt-bridge/tls/certificate.pem.crt": tmp_path / "cert.pem",
        "/etc/mqtt-bridge/tls/private.pem.key": tmp_path / "key.pem",
    }
    ca.cert_pem.write_to_path(str(paths["/etc/mqtt-bridge/tls/AmazonRootCA1.pem"]))
    cert.cert_chain_pems[0].write_to_path(str(paths["/etc/mqtt-bridge/tls/certificate.pem.crt"]))
    cert.private_key_pem.write_to_path(str(paths["/etc/mqtt-bridge/tls/private.pem.key"]))
    examples = Path(__file__).parent.parent / "deploy" / "examples"
    copies = []
    for name in ("dtb-aws-iot.yaml", "btd-aws-iot.yaml"):
        text = (
            (examples / name)
            .read_text()
            .replace("<ENDPOINT>", "abc123")
            .replace("<REGION>", "eu-west-1")
        )
        for placeholder, real in paths.items():
            text = text.replace(placeholder, str(real))
        (tmp_path / name).write_text(text)
        copies.append(str(tmp_path / name))
    assert main(["check", "-q", "--config", *copies]) == 0, capsys.readouterr().err


def test_throttling_disconnects_do_not_dead_letter_messages(rig: Rig) -> None:
    # DISCONNECT 0x97 (quota exceeded) four times in a row is the server's business:
    # the message in flight each time is not a poison message.
    def decide(n: int, topic: str, payload: bytes) -> int | tuple[str, int]:
        return ("disconnect", 0x97) if n < 4 else 0

    with FakeTarget(decide) as fake:
        worker = rig.worker(
            [{"source": f"{rig.prefix}/#"}], target_url=fake.url, heartbeat=NO_HEARTBEAT
        )
        with Publisher(rig.source.url) as pub:
            pub.publish_numbered([f"{rig.prefix}/a"], 20)
            pub.wait_acked()
        wait_until(lambda: len({p for _, p in fake.accepted}) >= 20, 60, what="all accepted")
        m = worker.metrics()
    assert m["dead_lettered"] == 0
    assert m["acknowledged"] == 20
    assert m["throttled{connection=0,reason=disconnect_quota_exceeded}"] == 4
