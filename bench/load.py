"""Load for the benchmark: C publishers and a C subscriber, numbered payloads, an oracle.

The generator is Mosquitto's own command-line clients, so the load costs little CPU:

- ``mosquitto_pub -l`` publishes one message per stdin line. Each publisher process has
  its own topic and reads a pre-generated file (throughput runs), or a pipe that a
  pacing thread writes at a fixed rate with the send time in every payload (latency
  runs).
- ``mosquitto_sub -F '%U %p'`` prints the receive time (ns resolution, wall clock) and
  the payload of each message, flushed per message, to a file that is parsed after
  the run.

A payload is ``<publisher>|<n>|<send time ns or 0>|xxxx…`` padded to the exact size,
so a line of the subscriber's output is always ``size + 22`` bytes: completion is
detected from the file size alone, without reading the file while the run goes on.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tests.harness import terminate

LINE_OVERHEAD = len("1795315399.268069292 ") + 1  # '%U ' before the payload, '\n' after
PROBE = b"probe"


def require_clients() -> None:
    missing = [c for c in ("mosquitto_pub", "mosquitto_sub") if not shutil.which(c)]
    if missing:
        raise SystemExit(
            f"error: {' and '.join(missing)} not found: apt-get install -y mosquitto-clients"
        )


def payload(pub: int, n: int, size: int, sent_ns: int = 0) -> bytes:
    head = f"{pub}|{n}|{sent_ns}|".encode()
    if len(head) > size:
        raise ValueError(f"payload size {size} is below the {len(head)}-byte header")
    return head + b"x" * (size - len(head))


# With 250,000 lines at QoS 1, ``mosquitto_pub -l`` (2.0.11) exited 0 with most of them
# unsent: at the end of stdin it waits for the PUBACK of its last message id, and past
# 65,535 messages the 16-bit ids wrap, so an earlier PUBACK with that id ends it. So one
# process never publishes more than this; a publisher's lane chains processes.
MAX_PER_PROCESS = 50_000


def write_lines(path: Path, pub: int, count: int, size: int, start: int = 0) -> Path:
    """A file of payloads ``start`` … ``start + count - 1``, one per line, for ``-l``."""
    if not path.exists():
        tmp = path.with_suffix(".part")
        with open(tmp, "wb", buffering=1 << 20) as f:
            for n in range(start, start + count):
                f.write(payload(pub, n, size) + b"\n")
        tmp.rename(path)
    return path


def lane_files(folder: Path, size: int, counts: list[int]) -> list[list[Path]]:
    """For each publisher, its numbered payloads in files of at most MAX_PER_PROCESS."""
    folder.mkdir(parents=True, exist_ok=True)
    lanes = []
    for pub, count in enumerate(counts):
        lane = []
        for start in range(0, count, MAX_PER_PROCESS):
            n = min(MAX_PER_PROCESS, count - start)
            lane.append(
                write_lines(folder / f"s{size}-p{pub}-{start}+{n}.txt", pub, n, size, start)
            )
        lanes.append(lane)
    return lanes


def spread(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal counts."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _pub_base(port: int, topic: str, qos: int) -> list[str]:
    return ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t", topic, "-q", str(qos)]


def _pub_cmd(port: int, topic: str, qos: int, client_id: str) -> list[str]:
    return [
        *_pub_base(port, topic, qos),
        "-i",
        client_id,
        "-M",
        "1000",  # QoS 1 publishes in flight per publisher (libmosquitto's default is 20)
        "-l",
        "--nodelay",  # no Nagle delay on the load's own socket
        "--quiet",
    ]


def _start_piped_publishers(
    procs: Procs, port: int, topics: list[str], qos: int, tag: str
) -> list[subprocess.Popen[bytes]]:
    """One publisher per topic reading its messages from a pipe, connected before return
    (so that the clock the caller starts next does not count process start-up)."""
    started = [
        procs.popen(
            _pub_cmd(port, topic, qos, f"{tag}-p{i}"),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i, topic in enumerate(topics)
    ]
    time.sleep(0.3)
    return started


def probe_once(port: int, topic: str, qos: int) -> None:
    subprocess.run(
        [*_pub_base(port, topic, qos), "-m", PROBE.decode(), "--quiet"],
        check=False,
        timeout=10,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@dataclass
class PublishResult:
    started: float  # wall clock, before the first publisher was launched
    finished: float  # wall clock, when the last publisher exited (QoS 1: everything acked)
    counts: list[int]  # messages per publisher
    ok: bool  # every publisher exited 0: everything was sent (QoS 1: acknowledged)
    errors: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts)


class Procs:
    """Child processes that must not outlive the benchmark, whatever happens."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def popen(self, cmd: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = subprocess.Popen(cmd, **kwargs)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


def publish_files(
    procs: Procs,
    port: int,
    topics: list[str],
    lanes: list[list[Path]],
    counts: list[int],
    qos: int,
    tag: str,
    timeout: float,
) -> PublishResult:
    """Every publisher at full speed from its files; returns once all have exited.

    The first process of each lane starts and connects first; the clock starts when
    the files begin to flow into their stdin (``sendfile`` into the pipe, no copy
    through Python). A lane's further files go to fresh processes, one after another.
    """
    first = _start_piped_publishers(procs, port, topics, qos, tag)
    failure: list[str] = []
    deadline = time.monotonic() + timeout

    def pour(path: Path, pipe: IO[bytes]) -> None:
        try:
            with open(path, "rb") as f:
                size, offset = os.fstat(f.fileno()).st_size, 0
                while offset < size:
                    offset += os.sendfile(pipe.fileno(), f.fileno(), offset, size - offset)
        except OSError as exc:
            failure.append(f"feeding a publisher failed: {exc}")
        finally:
            with contextlib.suppress(OSError):
                pipe.close()

    def lane(i: int) -> None:
        assert first[i].stdin is not None
        pour(lanes[i][0], first[i].stdin)
        proc = first[i]
        for k, path in enumerate(lanes[i][1:], 1):
            failure.extend(
                _wait_publishers([proc], started, [], deadline - time.monotonic()).errors
            )
            with open(path, "rb") as stdin:
                proc = procs.popen(
                    _pub_cmd(port, topics[i], qos, f"{tag}-p{i}-{k}"),
                    stdin=stdin,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
        last[i] = proc

    last: list[subprocess.Popen[bytes]] = list(first)
    started = time.time()
    threads = [threading.Thread(target=lane, args=(i,), daemon=True) for i in range(len(first))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()))
    result = _wait_publishers(last, started, counts, max(0.1, deadline - time.monotonic()))
    result.errors.extend(failure)
    result.ok = result.ok and not failure and not any(t.is_alive() for t in threads)
    return result


def _wait_publishers(
    running: list[subprocess.Popen[bytes]], started: float, counts: list[int], timeout: float
) -> PublishResult:
    deadline = time.monotonic() + timeout
    errors = []
    for proc in running:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            errors.append(f"publisher {proc.pid} still running after {timeout:g} s: killed")
            continue
        if proc.returncode:
            err = proc.stderr.read().decode(errors="replace")[-300:] if proc.stderr else ""
            errors.append(f"publisher exited {proc.returncode}: {err.strip()}")
    for proc in running:
        if proc.stderr:
            proc.stderr.close()
    return PublishResult(started, time.time(), counts, not errors, errors)


def publish_paced(
    procs: Procs,
    port: int,
    topics: list[str],
    counts: list[int],
    qos: int,
    size: int,
    rate: float,
    tag: str,
    timeout: float,
) -> PublishResult:
    """Publishers fed through pipes at ``rate`` msg/s in total, send time in each payload.

    One thread paces all pipes: every millisecond it writes what is due by then, so the
    stamped time is within ~1 ms of the moment ``mosquitto_pub`` reads the line.
    """
    running = _start_piped_publishers(procs, port, topics, qos, tag)
    started = time.time()
    pipes: list[IO[bytes]] = [p.stdin for p in running if p.stdin is not None]
    total = sum(counts)
    failure: list[str] = []

    def feed() -> None:
        next_n = [0] * len(pipes)
        sent = 0
        t0 = time.monotonic()
        try:
            while sent < total:
                due = min(total, int((time.monotonic() - t0) * rate) + 1)
                if due > sent:
                    batch: dict[int, list[bytes]] = defaultdict(list)
                    now = time.time_ns()
                    for _ in range(due - sent):
                        i = sent % len(pipes)  # round robin, as spread() splits the counts
                        if next_n[i] >= counts[i]:
                            i = next(j for j in range(len(pipes)) if next_n[j] < counts[j])
                        batch[i].append(payload(i, next_n[i], size, now) + b"\n")
                        next_n[i] += 1
                        sent += 1
                    for i, lines in batch.items():
                        pipes[i].write(b"".join(lines))
                        pipes[i].flush()
                time.sleep(0.001)
        except OSError as exc:
            failure.append(f"feeding publishers failed: {exc}")
        finally:
            for pipe in pipes:
                with contextlib.suppress(OSError):
                    pipe.close()

    thread = threading.Thread(target=feed, name="pacer", daemon=True)
    thread.start()
    thread.join(timeout)
    result = _wait_publishers(running, started, counts, max(5.0, timeout / 4))
    result.errors.extend(failure)
    result.ok = result.ok and not failure
    return result


class Subscriber:
    """``mosquitto_sub`` writing ``<receive time> <payload>`` lines to a file."""

    def __init__(
        self,
        procs: Procs,
        port: int,
        topic_filter: str,
        qos: int,
        out: Path,
        tag: str,
        persistent: bool = False,
    ) -> None:
        self.out = out
        self._file = open(out, "wb")  # noqa: SIM115 - closed in stop()
        cmd = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-t", topic_filter]
        cmd += ["-q", str(qos), "-i", f"{tag}-sub", "-F", "%U %p", "--nodelay"]
        if persistent:
            cmd.append("-c")  # no clean session: the broker keeps queueing while we are away
        self.proc = procs.popen(cmd, stdout=self._file, stderr=subprocess.DEVNULL)
        self.baseline = 0

    def size(self) -> int:
        try:
            return os.path.getsize(self.out)
        except OSError:
            return 0

    def wait_path(self, source_port: int, probe_topic: str, qos: int, timeout: float) -> None:
        """Probe through the whole path until a probe arrives: subscriber and bridge are up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto_sub exited {self.proc.returncode}")
            probe_once(source_port, probe_topic, qos)
            wait = time.monotonic() + 0.5
            while time.monotonic() < wait:
                if self.size() > 0:
                    time.sleep(0.3)  # stray probes land before the baseline is taken
                    self.baseline = self.size()
                    return
                time.sleep(0.02)
        raise TimeoutError(f"no probe came through the path within {timeout:g} s")

    def wait_bytes(
        self, expected: int, stall: float, timeout: float, publishing: threading.Event | None
    ) -> None:
        """Until ``expected`` bytes arrived after the probes (then 0.3 s quiet), or the
        output did not grow for ``stall`` seconds after the publishers finished."""
        deadline = time.monotonic() + timeout
        last, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            size = self.size() - self.baseline
            now = time.monotonic()
            if size != last:
                last, last_change = size, now
            if size >= expected and now - last_change > 0.3:
                return
            still_publishing = publishing is not None and publishing.is_set()
            if not still_publishing and now - last_change > stall:
                return
            time.sleep(0.02)

    def stop(self) -> None:
        terminate(self.proc, 5)
        self._file.close()


@dataclass
class Delivery:
    """What the subscriber got, checked against what the publishers had acknowledged."""

    expected: int
    delivered: int = 0  # every message line, duplicates included
    unique: int = 0
    lost: int = 0  # acknowledged by the source (publisher exited 0), never delivered
    duplicated: int = 0
    out_of_order: int = 0  # a first delivery numbered below one already seen on its topic
    unexpected: int = 0
    first_recv: float = 0.0
    last_recv: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)


def account(out: Path, counts: list[int], stamped: bool) -> Delivery:
    """Parse the subscriber's file: lost, duplicated, order, receive times, latencies."""
    result = Delivery(expected=sum(counts))
    seen: list[bytearray] = [bytearray(c) for c in counts]
    highest = [-1] * len(counts)
    first = last = 0.0
    lat = result.latencies_ms
    with open(out, "rb", buffering=1 << 20) as f:
        for line in f:
            stamp, _, rest = line[:80].partition(b" ")
            if rest.startswith(PROBE) or not rest:
                continue
            try:
                pub_text, n_text, sent_text, _ = rest.split(b"|", 3)
                pub, n = int(pub_text), int(n_text)
                received = float(stamp)
            except ValueError:
                result.unexpected += 1
                continue
            if not 0 <= pub < len(counts) or not 0 <= n < counts[pub]:
                result.unexpected += 1
                continue
            result.delivered += 1
            first = received if not first else min(first, received)
            last = max(last, received)
            if seen[pub][n]:
                result.duplicated += 1
                continue
            seen[pub][n] = 1
            if n < highest[pub]:
                result.out_of_order += 1
            else:
                highest[pub] = n
            if stamped:
                lat.append((received - int(sent_text) / 1e9) * 1000.0)
    result.unique = sum(s.count(1) for s in seen)
    result.lost = result.expected - result.unique
    result.first_recv, result.last_recv = first, last
    return result


def received_between(out: Path, start: float, end: float) -> int:
    """Message lines of the subscriber's file received in [start, end) (wall clock)."""
    count = 0
    with open(out, "rb", buffering=1 << 20) as f:
        for line in f:
            stamp, _, rest = line[:40].partition(b" ")
            if rest.startswith(PROBE):
                continue
            try:
                if start <= float(stamp) < end:
                    count += 1
            except ValueError:
                continue
    return count


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q / 100.0 * (len(sorted_values) - 1))))
    return sorted_values[k]
