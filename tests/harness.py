"""Throwaway brokers, bridge workers and a message oracle, shared by tests, demo and bench.

The oracle's clients use paho-mqtt: an MQTT implementation independent of the
bridge's own, so a codec bug cannot hide itself on both ends.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Any, timeout: float, interval: float = 0.05, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def terminate(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if not found:
        raise RuntimeError("mosquitto not found: apt-get install -y mosquitto mosquitto-clients")
    return found


class Mosquitto:
    """A Mosquitto process on a free loopback port, configured for lossless tests.

    ``max_queued_messages 0`` lets a session hold a backlog of any size (Mosquitto's
    default of 1000 would drop beyond that: a broker setting, not a bridge loss), and
    ``persistence`` keeps sessions across a stop/start of the broker.
    """

    def __init__(
        self, workdir: Path, name: str = "broker", extra: str = "", port: int | None = None
    ):
        self.workdir = workdir / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.port = port or free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = self.workdir / "mosquitto.conf"
        self.log = self.workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Mosquitto:
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            # As root Mosquitto would switch to user 'mosquitto', who cannot write here.
            f"user {getpass.getuser()}\n"
            "max_queued_messages 0\n"
            "max_inflight_messages 1000\n"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "autosave_interval 0\n"
            f"{self.extra}\n"
        )
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [mosquitto_binary(), "-c", str(self.conf)], stdout=log, stderr=log
            )
        wait_until(self._accepts, 10, what=f"mosquitto {self.name} on port {self.port}")
        return self

    def _accepts(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"mosquitto {self.name} exited: {self.log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
            return True
        return False

    def stop(self) -> None:
        """SIGTERM: Mosquitto saves its sessions (persistence) and exits."""
        terminate(self.proc, 10)
        self.proc = None

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def bridge_config(
    source_url: str,
    target_url: str,
    routes: list[dict[str, Any]],
    instance_id: str = "w-0",
    direction: str = "dtb",
    http_port: int | None = None,
    source_protocol: str = "5",
    target_protocol: str = "5",
    **sections: Any,
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "instance_id": instance_id,
        "direction": direction,
        "source": {"url": source_url, "protocol": source_protocol},
        "target": {"url": target_url, "protocol": target_protocol},
        "routes": routes,
        "http": {"listen": f"127.0.0.1:{http_port or free_port()}"},
        "log": {"stats_interval": 2},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


class Worker:
    """``mqtt-bridge run`` as a child process, as a container would run it."""

    def __init__(self, workdir: Path, cfg: dict[str, Any], name: str | None = None):
        self.cfg = cfg
        self.name = name or cfg["instance_id"]
        self.config_path = workdir / f"{self.name}.yaml"
        self.log_path = workdir / f"{self.name}.log"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.proc: subprocess.Popen[bytes] | None = None
        self.http_port = int(cfg["http"]["listen"].rsplit(":", 1)[1])

    def start(self, wait_ready: bool = True) -> Worker:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bridge", "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=log,
                env=env,
                cwd=ROOT,
            )
        if wait_ready:
            wait_until(self.ready, 15, what=f"worker {self.name} ready")
        return self

    def _get(self, path: str) -> tuple[int, str]:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"worker {self.name} exited: {self.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=2) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()
        except OSError:
            return 0, ""

    def ready(self) -> bool:
        return self._get("/readyz")[0] == 200

    def readyz(self) -> tuple[int, dict[str, Any]]:
        """/readyz: the status and the facts behind it."""
        status, body = self._get("/readyz")
        return status, json.loads(body) if body else {}

    def metrics(self) -> dict[str, float]:
        """Samples keyed by name plus sorted labels other than direction, e.g.
        'dropped{reason=loop,route=r}'; the bare name holds the sum over labels."""
        status, text = self._get("/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return parse_metrics(text)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        terminate(self.proc, 30)

    def logged(self, event: str) -> list[dict[str, Any]]:
        """The worker's JSON log lines of one event, oldest first."""
        if not self.log_path.exists():
            return []
        tag = f'"event":"{event}"'
        return [
            json.loads(line)
            for line in self.log_path.read_text(errors="replace").splitlines()
            if tag in line and line.startswith("{")
        ]

    def inflight_peak(self, timeout: float = 15) -> int:
        """The highest in-flight count so far, from a ``bridge.stats`` line logged after
        this call (the peak is a log field: a scraped gauge would miss it between scrapes)."""
        seen = len(self.logged("bridge.stats"))
        wait_until(lambda: len(self.logged("bridge.stats")) > seen, timeout, what="bridge.stats")
        return int(self.logged("bridge.stats")[-1]["inflight_peak"])

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, value = line.rsplit(" ", 1)
        name, _, labels = name_labels.partition("{")
        name = name.removeprefix("mqtt_bridge_").removesuffix("_total")
        kept = sorted(
            part
            for part in labels.rstrip("}").split(",")
            if part and not part.startswith("direction=")
        )
        key = name + ("{" + ",".join(p.replace('"', "") for p in kept) + "}" if kept else "")
        out[key] += float(value)
        if kept:
            out[name] += float(value)
    return out


# ---- the oracle ------------------------------------------------------------------


def _client(client_id: str, protocol: str) -> paho.Client:
    proto = paho.MQTTv5 if protocol == "5" else paho.MQTTv311
    kwargs: dict[str, Any] = {"client_id": client_id, "protocol": proto}
    if proto == paho.MQTTv311:
        kwargs["clean_session"] = False
    client = paho.Client(CallbackAPIVersion.VERSION2, **kwargs)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.reconnect_delay_set(0.1, 1)
    return client


def _connect(client: paho.Client, url: str, protocol: str, persistent: bool = True) -> None:
    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    if protocol == "5":
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600 if persistent else 0
        client.connect(host, int(port), keepalive=30, clean_start=not persistent, properties=props)
    else:
        client.connect(host, int(port), keepalive=30)


@dataclass
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    user_properties: list[tuple[str, str]]
    properties: dict[str, Any]


class Collector:
    """Subscribes on a broker (persistent session) and records every message it gets."""

    def __init__(
        self, url: str, topic_filter: str = "#", protocol: str = "5", client_id: str | None = None
    ):
        self.url = url
        self.protocol = protocol
        self.filter = topic_filter
        self.messages: list[Received] = []
        self._subscribed = threading.Event()
        self.client = _client(client_id or f"collector-{free_port()}", protocol)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any = None
    ) -> None:
        client.subscribe(self.filter, qos=1)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        props: dict[str, Any] = {}
        user: list[tuple[str, str]] = []
        if msg.properties is not None:
            for name in ("ContentType", "PayloadFormatIndicator", "MessageExpiryInterval",
                         "ResponseTopic", "CorrelationData"):  # fmt: skip
                if hasattr(msg.properties, name):
                    props[name] = getattr(msg.properties, name)
            user = list(getattr(msg.properties, "UserProperty", []))
        self.messages.append(
            Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), user, props)
        )

    def __enter__(self) -> Collector:
        _connect(self.client, self.url, self.protocol)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError(f"collector could not subscribe on {self.url}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def count(self) -> int:
        return len(self.messages)

    def wait_for(self, n: int, timeout: float = 120, stall: float = 10) -> int:
        """Wait until ``n`` messages arrived, or none arrived for ``stall`` seconds.

        Returns the count instead of raising, so that a shortfall is reported by the
        oracle as lost messages rather than as a timeout.
        """
        deadline = time.monotonic() + timeout
        last, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            count = len(self.messages)
            if count >= n:
                break
            if count != last:
                last, last_change = count, time.monotonic()
            elif time.monotonic() - last_change > stall:
                break
            time.sleep(0.05)
        return len(self.messages)


class Publisher:
    """Publishes numbered payloads ``b'<topic>|<n>|<padding>'``; remembers what the broker acked."""

    def __init__(self, url: str, protocol: str = "5", client_id: str | None = None):
        self.url = url
        self.protocol = protocol
        self.client = _client(client_id or f"publisher-{free_port()}", protocol)
        self.client.on_publish = self._on_publish
        self._infos: list[tuple[str, int, paho.MQTTMessageInfo]] = []
        self._completed = 0

    # paho rescans its whole outgoing queue on every PUBACK: keep that queue short
    # by never having more than this many publishes outstanding.
    MAX_OUTSTANDING = 900

    def _on_publish(self, *args: Any) -> None:
        self._completed += 1

    def __enter__(self) -> Publisher:
        _connect(self.client, self.url, self.protocol, persistent=False)
        self.client.loop_start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(
        self,
        topic: str,
        n: int,
        qos: int = 1,
        size: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> None:
        payload = f"{topic}|{n}|".encode()
        payload += b"x" * max(0, size - len(payload))
        if qos:
            while len(self._infos) - self._completed >= self.MAX_OUTSTANDING:
                time.sleep(0.0005)
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        self._infos.append((topic, n, info))

    def publish_numbered(
        self, topics: list[str], count: int, qos: int = 1, size: int = 0, rate: float | None = None
    ) -> None:
        """``count`` messages round-robin over ``topics``, numbered per topic from 0."""
        started = time.monotonic()
        for i in range(count):
            self.publish(topics[i % len(topics)], i // len(topics), qos, size)
            if rate and i % 50 == 0:
                ahead = started + i / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)

    def publish_in_background(
        self, topics: list[str], count: int, qos: int = 1, size: int = 0, rate: float | None = None
    ) -> threading.Thread:
        thread = threading.Thread(
            target=self.publish_numbered, args=(topics, count, qos, size, rate), daemon=True
        )
        thread.start()
        return thread

    @property
    def sent(self) -> int:
        return len(self._infos)

    def wait_acked(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        for _, _, info in self._infos:
            info.wait_for_publish(max(0.01, deadline - time.monotonic()))

    def acked(self) -> dict[str, set[int]]:
        out: dict[str, set[int]] = defaultdict(set)
        for topic, n, info in self._infos:
            if info.is_published():
                out[topic].add(n)
        return out


@dataclass
class Report:
    expected: int
    delivered: int
    lost: int
    duplicated: int
    unexpected: int
    out_of_order: int
    lost_examples: list[tuple[str, int]] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"expected={self.expected} delivered={self.delivered} lost={self.lost} "
            f"duplicated={self.duplicated} unexpected={self.unexpected} "
            f"out_of_order={self.out_of_order}"
        )


def check(
    acked: dict[str, set[int]],
    received: Iterable[Received],
    map_topic: Any = lambda t: t,
    dead_lettered: Iterable[tuple[str, int]] = (),
) -> Report:
    """Compare what the source acknowledged with what arrived at the target.

    lost: acknowledged by the source, never delivered, not dead-lettered.
    duplicated: delivered more than once. unexpected: delivered, never acknowledged
    (or on the wrong topic). out_of_order: a first delivery numbered below one already
    seen on its topic.
    """
    expected_by_target = {map_topic(topic): (topic, ns) for topic, ns in acked.items()}
    seen: dict[str, set[int]] = defaultdict(set)
    highest: dict[str, int] = {}
    duplicated = unexpected = out_of_order = delivered = 0
    for msg in received:
        delivered += 1
        try:
            source_topic, n_text, _ = msg.payload.split(b"|", 2)
            n = int(n_text)
        except ValueError:
            unexpected += 1
            continue
        want = expected_by_target.get(msg.topic)
        if want is None or want[0] != source_topic.decode() or n not in want[1]:
            unexpected += 1
            continue
        if n in seen[msg.topic]:
            duplicated += 1
            continue
        seen[msg.topic].add(n)
        if n < highest.get(msg.topic, -1):
            out_of_order += 1
        highest[msg.topic] = max(highest.get(msg.topic, -1), n)
    dead = set(dead_lettered)
    lost = [
        (source, n)
        for target, (source, ns) in expected_by_target.items()
        for n in sorted(ns - seen[target])
        if (source, n) not in dead
    ]
    return Report(
        expected=sum(len(ns) for ns in acked.values()),
        delivered=delivered,
        lost=len(lost),
        duplicated=duplicated,
        unexpected=unexpected,
        out_of_order=out_of_order,
        lost_examples=lost[:10],
    )


@contextlib.contextmanager
def workdir(prefix: str = "mqtt-bridge-") -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
