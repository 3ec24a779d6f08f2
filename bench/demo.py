"""`make demo`: DTB and BTD between two throwaway Mosquitto brokers, with live counts.

Devices publish numbered telemetry on the device broker; two DTB workers in one
share group republish it to the cloud broker, where a backend collects it. The
backend publishes numbered commands on the cloud broker; a BTD worker republishes
them to the device broker, where the devices collect them. At the end every
acknowledged message is accounted for: lost must be 0.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.harness import (
    Collector,
    Mosquitto,
    Publisher,
    Worker,
    bridge_config,
    check,
    workdir,
)

DEVICES = 20


def _configs(device: Mosquitto, cloud: Mosquitto) -> dict[str, dict[str, object]]:
    dtb_routes = [
        {
            "source": "devices/+/telemetry",
            "share_group": "telemetry-svc",
            "target": "dt/{1}/telemetry",
        }
    ]
    btd_routes = [{"source": "cmd/+/set", "share_group": "btd", "target": "devices/{1}/commands"}]
    return {
        "dtb-0": bridge_config(device.url, cloud.url, dtb_routes, instance_id="dtb-0"),
        "dtb-1": bridge_config(device.url, cloud.url, dtb_routes, instance_id="dtb-1"),
        "btd-0": bridge_config(
            cloud.url, device.url, btd_routes, instance_id="btd-0", direction="btd"
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=20.0, help="how long devices publish")
    parser.add_argument("--rate", type=float, default=3000.0, help="telemetry msg/s offered")
    parser.add_argument("--command-rate", type=float, default=300.0, help="command msg/s offered")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the worker configs and logs (printed at the end) instead of removing them",
    )
    args = parser.parse_args()

    with (
        _directory(args.keep) as wd,
        Mosquitto(wd, "device-broker") as device,
        Mosquitto(wd, "cloud-broker") as cloud,
    ):
        print(f"device broker {device.url}   cloud broker {cloud.url}   (throwaway, in {wd})")
        workers = [Worker(wd, cfg) for cfg in _configs(device, cloud).values()]
        paths = [str(w.config_path) for w in workers]
        checked = subprocess.run(
            [sys.executable, "-m", "bridge", "check", "-q", "--config", *paths], check=False
        )
        if checked.returncode:
            return checked.returncode
        print("mqtt-bridge check: dtb-0, dtb-1, btd-0 valid, no loops between them")
        try:
            for w in workers:
                w.start()
            print("workers ready: dtb-0 dtb-1 (share group telemetry-svc), btd-0\n")
            return _run(args, device, cloud, workers, wd)
        finally:
            for w in workers:
                w.stop()
            logs = [w.log_path for w in workers]
            if args.keep:
                print(f"\nkept in {wd}:")
                for w in workers:
                    print(f"  {w.config_path}  (log: {w.log_path.name})")
                print(
                    "  try: mqtt-bridge check --config "
                    + " ".join(str(w.config_path) for w in workers)
                    + "\n  (the demo's brokers are gone: point source/target at yours to run one)"
                )
            else:
                names = ", ".join(p.name for p in logs)
                print(f"\nworker logs: {names} (removed with the demo dir; --keep keeps them)")


@contextlib.contextmanager
def _directory(keep: bool) -> Iterator[Path]:
    """The demo's work directory: removed at the end unless ``keep``."""
    if keep:
        yield Path(tempfile.mkdtemp(prefix="mqtt-bridge-demo-"))
    else:
        with workdir("mqtt-bridge-demo-") as wd:
            yield wd


def _run(
    args: argparse.Namespace, device: Mosquitto, cloud: Mosquitto, workers: list[Worker], wd: Path
) -> int:
    telemetry = [f"devices/dev{i:03d}/telemetry" for i in range(DEVICES)]
    commands = [f"cmd/dev{i:03d}/set" for i in range(DEVICES)]
    n_telemetry = int(args.rate * args.seconds)
    n_commands = int(args.command_rate * args.seconds)
    with (
        Collector(cloud.url, "dt/#", client_id="backend") as backend,
        Collector(device.url, "devices/+/commands", client_id="devices") as devices,
        Publisher(device.url, client_id="devices-pub") as device_pub,
        Publisher(cloud.url, client_id="backend-pub") as backend_pub,
    ):
        started = time.monotonic()
        t1 = device_pub.publish_in_background(telemetry, n_telemetry, size=200, rate=args.rate)
        t2 = backend_pub.publish_in_background(
            commands, n_commands, size=100, rate=args.command_rate
        )
        header = ("time", "dtb delivered", "msg/s", "btd delivered", "in flight")
        print(" ".join(f"{h:>{w}}" for h, w in zip(header, (5, 14, 7, 14, 10), strict=True)))
        last, last_t = 0, started
        while (
            t1.is_alive()
            or t2.is_alive()
            or backend.count() < n_telemetry
            or devices.count() < n_commands
        ):
            time.sleep(1.0)
            now = time.monotonic()
            inflight = sum(w.metrics().get("inflight_messages", 0) for w in workers)
            got = backend.count()
            rate = (got - last) / (now - last_t)
            last, last_t = got, now
            elapsed = now - started
            print(f"{elapsed:5.1f} {got:14d} {rate:7.0f} {devices.count():14d} {int(inflight):10d}")
            if now - started > args.seconds + 60:
                print("giving up waiting for the rest")
                break
        elapsed = time.monotonic() - started
        device_pub.wait_acked(30)
        backend_pub.wait_acked(30)
        time.sleep(0.5)
        dtb = check(
            device_pub.acked(), backend.messages, lambda t: "dt/" + t.split("/")[1] + "/telemetry"
        )
        btd = check(
            backend_pub.acked(),
            devices.messages,
            lambda t: "devices/" + t.split("/")[1] + "/commands",
        )
    shares = {w.name: int(w.metrics()["received"]) for w in workers}
    print("\nsummary")
    print(f"  DTB  {dtb}")
    print(f"  BTD  {btd}")
    print(f"  per worker received: {shares}")
    print(
        f"  throughput: DTB {dtb.delivered / elapsed:.0f} msg/s offered at {args.rate:.0f} msg/s "
        f"over {elapsed:.1f} s (QoS 1, 200-byte payloads, end-to-end acks)"
    )
    ok = dtb.lost == 0 and btd.lost == 0 and dtb.unexpected == 0 and btd.unexpected == 0
    print(f"  lost = {dtb.lost + btd.lost}  ->  {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
