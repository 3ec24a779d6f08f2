"""`python -m bench.archive`: what the S3 archive's `required` mode costs in throughput.

One worker between two throwaway Mosquitto brokers, archiving to moto (a real S3 API over
HTTP, in this process), QoS 1 messages from C publishers at full speed. The same worker
settings run with ``backup.s3.mode: best_effort`` and with ``required``; the figure is
``required`` msg/s ÷ ``best_effort`` msg/s (the goal: at least 0.8).

moto runs on the same cores as the worker, and a real S3 write takes longer than moto's
(tens of milliseconds): read the ratio, not the absolute rates, and see README "Sizing
`required`" for the rule that turns S3 latency into throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import boto3
import psutil

from bench import load
from bench.load import Procs
from bench.paths import BROKER_EXTRA, worker_config
from tests.harness import Mosquitto, Worker, workdir


def run_mode(
    wd: Path, procs: Procs, mode: str, args: argparse.Namespace, s3_url: str, bucket: str
) -> dict[str, Any]:
    run = wd / mode
    run.mkdir()
    with (
        Mosquitto(run, "A", extra=BROKER_EXTRA) as a,
        Mosquitto(run, "B", extra=BROKER_EXTRA) as b,
    ):
        cfg = worker_config(a.url, b.url, 0, 1, args.max_inflight)
        cfg["backup"] = {
            "s3": {
                "bucket": bucket, "prefix": f"{mode}/", "endpoint_url": s3_url,
                "region": "us-east-1", "mode": mode, "flush_interval": args.flush_interval,
                "max_uploads": args.max_uploads,
            }
        }  # fmt: skip
        worker = Worker(run, cfg)
        worker.start()
        assert worker.proc is not None
        cpu = psutil.Process(worker.proc.pid)
        try:
            topics = [f"bench/{mode}/t{i}" for i in range(args.publishers)]
            counts = load.spread(args.messages, args.publishers)
            out = run / "sub.out"
            sub = load.Subscriber(procs, b.port, f"out/bench/{mode}/#", 1, out, f"arch-{mode}")
            try:
                sub.wait_path(a.port, f"bench/{mode}/probe", 1, timeout=20)
                files = load.lane_files(wd / "load", args.size, counts)
                timeout = 120 + args.messages / 200
                cpu0 = sum(cpu.cpu_times()[:2])
                pub = load.publish_files(procs, a.port, topics, files, counts, 1, mode, timeout)
                expected = args.messages * (args.size + load.LINE_OVERHEAD)
                sub.wait_bytes(expected, 10, timeout, None)
                worker_cpu = sum(cpu.cpu_times()[:2]) - cpu0
            finally:
                sub.stop()
            d = load.account(out, counts, stamped=False)
            metrics = worker.metrics()
        finally:
            worker.stop()
    elapsed = max(1e-9, d.last_recv - pub.started)
    return {
        "mode": mode,
        "messages": args.messages,
        "unique": d.unique,
        "lost": d.lost,
        "duplicated": d.duplicated,
        "seconds": round(elapsed, 3),
        "msg_per_s": round(d.unique / elapsed) if d.unique else 0,
        "worker_cpu_s_per_100k": round(worker_cpu * 100_000 / max(1, d.unique), 2),
        "archive_objects": int(metrics.get("archive_batches", 0)),
        "archive_records": int(metrics.get("archive_records", 0)),
        "publish_ok": pub.ok,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Both modes on the same settings (``args`` as ``main`` parses them, ``out`` unused):
    the runs and their ratio. Also what ``make bench`` runs (bench/shapes.py)."""
    from moto.server import ThreadedMotoServer

    # moto's HTTP server logs every request; the bench's output is for its figures
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}.items():
        os.environ.setdefault(key, value)  # moto takes any; the workers inherit them
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    procs = Procs()
    try:
        host, port = server.get_host_and_port()
        s3_url = f"http://{host}:{port}"
        bucket = "bench-archive"
        boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1").create_bucket(
            Bucket=bucket
        )
        results = []
        with workdir("mqtt-bridge-bench-archive-") as wd:
            for mode in ("best_effort", "required"):
                result = run_mode(wd, procs, mode, args, s3_url, bucket)
                print(json.dumps(result), flush=True)
                results.append(result)
    finally:
        procs.close()
        with contextlib.suppress(Exception):
            server.stop()
    best, required = results
    ratio = required["msg_per_s"] / max(1, best["msg_per_s"])
    return {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "runs": results,
        "required_vs_best_effort": round(ratio, 2),
        "lost": sum(r["lost"] for r in results),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--messages", type=int, default=50_000)
    p.add_argument("--size", type=int, default=200)
    p.add_argument("--publishers", type=int, default=2)
    p.add_argument("--max-inflight", type=int, default=1000)
    p.add_argument("--flush-interval", type=float, default=1.0)
    p.add_argument("--max-uploads", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    load.require_clients()
    summary = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "archive.json").write_text(json.dumps(summary, indent=1) + "\n")
    ratio = summary["required_vs_best_effort"]
    print(f"required / best_effort throughput: {ratio:.2f} (goal >= 0.8)")
    return 0 if summary["lost"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
