"""mTLS to a broker configured like the cloud side; bad certificates never lose a message."""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from bridge.config import TlsConfig
from bridge.mqtt import Endpoint, MqttConnection
from tests.conftest import Rig
from tests.harness import (
    Collector,
    Mosquitto,
    Publisher,
    Worker,
    bridge_config,
    check,
    free_port,
    wait_until,
)
from tests.test_codec import OPTIONS, Recorder


@dataclass
class Pki:
    dir: Path
    ca: Path
    client_cert: Path
    client_key: Path
    other_ca: Path

    def server_pair(self, name: str) -> tuple[Path, Path]:
        return self.dir / f"{name}.pem", self.dir / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    certs = {
        "good": ca.issue_cert("localhost", "127.0.0.1"),
        "expired": ca.issue_cert(
            "localhost", not_before=past - dt.timedelta(days=30), not_after=past
        ),
        "wrong-host": ca.issue_cert("wrong.example"),
        "client": ca.issue_cert("dtb-0"),
    }
    for name, cert in certs.items():
        cert.cert_chain_pems[0].write_to_path(str(d / f"{name}.pem"))
        cert.private_key_pem.write_to_path(str(d / f"{name}.key"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    other.cert_pem.write_to_path(str(d / "other-ca.pem"))
    return Pki(d, d / "ca.pem", d / "client.pem", d / "client.key", d / "other-ca.pem")


def tls_broker(tmp_path: Path, pki: Pki, server: str, name: str, tls_port: int) -> Mosquitto:
    cert, key = pki.server_pair(server)
    # A plain listener for the test's collector, and the cloud-like mTLS listener.
    extra = (
        f"listener {tls_port} 127.0.0.1\n"
        f"cafile {pki.ca}\ncertfile {cert}\nkeyfile {key}\n"
        "require_certificate true\ntls_version tlsv1.2\n"
        "message_size_limit 131072\n"
    )
    return Mosquitto(tmp_path, name, extra=extra)


def tls_target(port: int, pki: Pki, **changes: object) -> dict[str, object]:
    tls: dict[str, object] = {
        "ca_file": str(pki.ca),
        "cert_file": str(pki.client_cert),
        "key_file": str(pki.client_key),
    }
    tls.update(changes)
    return {
        "url": f"mqtts://localhost:{port}",
        "protocol": "5",
        "tls": {k: v for k, v in tls.items() if v is not None},
    }


CASES = {
    # case: (server certificate, client tls changes, expected log text, fix is on the server?)
    "unknown-ca": ("good", {"ca_file": "OTHER"}, "certificate verify failed", False),
    "expired": ("expired", {}, "certificate has expired", True),
    "wrong-host": ("wrong-host", {}, "Hostname mismatch", True),
    "no-client-cert": (
        "good",
        {"cert_file": None, "key_file": None},
        "certificate required",
        False,
    ),
}


def test_mtls_delivers(rig: Rig, pki: Pki) -> None:
    tls_port = free_port()
    with tls_broker(rig.tmp, pki, "good", "cloud", tls_port) as cloud:
        cfg = bridge_config(rig.source.url, "unused", [{"source": f"{rig.prefix}/#"}])
        cfg["target"] = tls_target(tls_port, pki)
        rig.workers.append(Worker(rig.tmp, cfg).start())
        with (
            Collector(cloud.url, f"{rig.prefix}/#") as collector,
            Publisher(rig.source.url) as pub,
        ):
            pub.publish_numbered([f"{rig.prefix}/a", f"{rig.prefix}/b"], 200)
            pub.wait_acked()
            collector.wait_for(200, 30)
            report = check(pub.acked(), collector.messages)
    assert report.lost == 0, report
    assert report.out_of_order == 0


@pytest.mark.parametrize("case", list(CASES))
def test_bad_certificate_is_one_clear_line_and_loses_nothing(rig: Rig, pki: Pki, case: str) -> None:
    server_cert, changes, expected, fix_on_server = CASES[case]
    changes = {k: (str(pki.other_ca) if v == "OTHER" else v) for k, v in changes.items()}
    tls_port = free_port()
    cloud = tls_broker(rig.tmp, pki, server_cert, "cloud", tls_port).start()
    try:
        cfg = bridge_config(
            rig.source.url,
            "unused",
            [{"source": f"{rig.prefix}/#"}],
            instance_id="dtb-0",
            shutdown={"deadline": 2},
        )
        cfg["target"] = tls_target(tls_port, pki, **changes)
        bad = Worker(rig.tmp, cfg, name="bad")
        rig.workers.append(bad.start(wait_ready=False))
        wait_until(lambda: "target.connect_failed" in bad.log_tail(), 15, what="a connect failure")
        with Publisher(rig.source.url) as pub:
            pub.publish_numbered([f"{rig.prefix}/a"], 50)
            pub.wait_acked()
            acked = pub.acked()
        time.sleep(1.0)
        assert not bad.ready()
        metrics = bad.metrics()
        assert metrics["received"] == 50
        assert metrics["acknowledged"] == 0  # nothing acknowledged at the source
        failures = [
            line for line in bad.log_tail(100_000).splitlines() if "target.connect_failed" in line
        ]
        assert failures
        assert [line for line in failures if expected not in line] == []
        bad.signal(signal.SIGTERM)
        assert bad.wait(10) == 0
        if fix_on_server:
            cloud.stop()
            cloud = tls_broker(rig.tmp, pki, "good", "cloud", tls_port).start()
        cfg["target"] = tls_target(tls_port, pki)
        with Collector(cloud.url, f"{rig.prefix}/#") as collector:
            rig.workers.append(Worker(rig.tmp, cfg, name="fixed").start())
            collector.wait_for(50, 30)
            report = check(acked, collector.messages)
        assert report.lost == 0, report
    finally:
        cloud.stop()


async def test_alpn_and_sni_are_offered(pki: Pki) -> None:
    seen: dict[str, object] = {}
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(*map(str, pki.server_pair("wrong-host")))
    server_ctx.set_alpn_protocols(["x-amzn-mqtt-ca"])

    def record_sni(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        seen["sni"] = name

    server_ctx.sni_callback = record_sni  # type: ignore[assignment]

    async def handshake_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen["alpn"] = writer.get_extra_info("ssl_object").selected_alpn_protocol()
        await reader.read(1024)
        writer.write(b"\x20\x03\x00\x00\x00")
        await writer.drain()
        await reader.read(1024)

    tls = TlsConfig(ca_file=pki.ca, alpn=["x-amzn-mqtt-ca"], server_name="wrong.example")
    server = await asyncio.start_server(handshake_only, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        conn = MqttConnection(OPTIONS, Recorder())
        await conn.connect(Endpoint("127.0.0.1", port, tls.context, tls.server_name))
        await conn.disconnect()
    finally:
        server.close()
    assert seen == {"sni": "wrong.example", "alpn": "x-amzn-mqtt-ca"}
