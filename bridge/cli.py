"""Command line: argument parsing only. User errors are one line each, never a traceback."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

import yaml

from bridge import __version__
from bridge.config import BridgeConfig, cross_check, load_config, located
from bridge.errors import ConfigError
from bridge.loader import bridge_variables
from bridge.sizing import sizing_problems


def _number(kind: Callable[[str], float], low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] (a rate of -1 would spin)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r}: must be between {low:g} and {high:g}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other user error (argparse prints usage too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mqtt-bridge",
        description="Republish MQTT between a device broker and AWS IoT Core, at least once.",
    )
    parser.add_argument("--version", action="version", version=f"mqtt-bridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run one worker")
    run.add_argument("--config", required=True, metavar="FILE")
    run.add_argument(
        "--log-format",
        choices=["json", "console"],
        help="override log.format (console: for people)",
    )
    check = sub.add_parser(
        "check", help="validate configuration files (with loop checks across them) and print them"
    )
    check.add_argument("--config", required=True, nargs="+", metavar="FILE")
    check.add_argument("--quiet", "-q", action="store_true", help="print only problems")
    check.add_argument(
        "--strict", action="store_true", help="sizing warnings are errors too (exit 2)"
    )
    replay = sub.add_parser("replay", help="re-drive archived messages from S3 to the target")
    replay.add_argument("--config", required=True, metavar="FILE", help="target and S3 settings")
    replay.add_argument("--from", dest="source", required=True, metavar="s3://BUCKET/PREFIX")
    replay.add_argument("--since", metavar="T", help="ISO 8601 time or epoch seconds (inclusive)")
    replay.add_argument("--until", metavar="T", help="ISO 8601 time or epoch seconds (exclusive)")
    replay.add_argument(
        "--route", metavar="R", help="only records of this route (its name or filter)"
    )
    replay.add_argument("--topic-filter", metavar="F", help="only source topics matching F")
    replay.add_argument(
        "--rate",
        type=_number(float, 0.001, 1e6),
        metavar="N",
        help="at most N messages per second",
    )
    replay.add_argument(
        "--max-record-bytes",
        type=_number(int, 1024, 2**31),
        default=16 * 1024 * 1024,
        metavar="B",
        help="skip (and report) an archived line longer than this (default 16 MiB)",
    )
    replay.add_argument(
        "--max-object-bytes",
        type=_number(int, 1024, 2**40),
        default=256 * 1024 * 1024,
        metavar="B",
        help="skip (and report) an object that inflates to more than this (default 256 MiB)",
    )
    replay.add_argument(
        "--to-source-topic",
        action="store_true",
        help="publish to the source topic, not target_topic",
    )
    replay.add_argument("--dry-run", action="store_true", help="read and count, publish nothing")
    sessions = sub.add_parser(
        "sessions", help="list the member records on the source broker (live, stopped, gone)"
    )
    sessions.add_argument("--config", required=True, metavar="FILE")
    adopt = sub.add_parser(
        "adopt", help="drain and end one source session by hand (a worker that is gone)"
    )
    adopt.add_argument("--config", required=True, metavar="FILE", help="routes and target")
    adopt.add_argument("--client-id", required=True, metavar="ID", help="the session's client id")
    sync = sub.add_parser(
        "sync-retained",
        help="copy the source's retained messages to the target (shared subscriptions get none)",
    )
    sync.add_argument("--config", required=True, metavar="FILE")
    sync.add_argument("--route", metavar="R", help="only this route (its name or filter)")
    sync.add_argument("--dry-run", action="store_true", help="take and count, publish nothing")
    sync.add_argument(
        "--quiet",
        type=float,
        default=2.0,
        metavar="S",
        help="done once nothing is in flight and nothing arrived for S seconds (default 2)",
    )
    sync.add_argument(
        "--timeout", type=float, default=300.0, metavar="S", help="give up after S seconds"
    )
    cohort = sub.add_parser(
        "cohort", help="which devices a route's cohort holds (ids as arguments or on stdin)"
    )
    cohort.add_argument("--config", required=True, metavar="FILE")
    cohort.add_argument("--route", metavar="R", help="the route (its name or filter)")
    cohort.add_argument("devices", nargs="*", metavar="DEVICE", help="default: one id per line")
    replay.add_argument(
        "--progress-every",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds between progress lines when stderr is not a terminal (default 10)",
    )
    health = sub.add_parser(
        "health", help="exit 0 when a worker's /healthz answers 200 (HEALTHCHECK)"
    )
    health.add_argument("--url", default="http://127.0.0.1:9100/healthz")
    health.add_argument("--timeout", type=_number(float, 0.01, 300), default=3.0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "health":
        return _health(args.url, args.timeout)
    try:
        if args.command == "check":
            return _check(args.config, args.quiet, args.strict)
        cfg = load_config(args.config)
        if args.command == "replay":
            return _replay(cfg, args)
        if args.command in ("sessions", "adopt"):
            return _sessions(cfg, args)
        if args.command == "sync-retained":
            return _sync_retained(cfg, args)
        if args.command == "cohort":
            return _cohort(cfg, args.route, args.devices)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    from bridge.runtime import run_worker

    try:
        return run_worker(cfg, args.log_format, args.config)
    except ConfigError as exc:  # what only the start can find out (a port in use)
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _health(url: str, timeout: float) -> int:
    import urllib.request

    from bridge.urls import redact_url

    if not url.startswith(("http://", "https://")):
        print(
            f"error: health: --url must be an http:// URL, got {redact_url(url)!r}", file=sys.stderr
        )
        return 2
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 0 if response.status == 200 else 1
    except (OSError, ValueError) as exc:  # ValueError: a URL urllib cannot use
        print(f"unhealthy: {redact_url(url)}: {redact_url(str(exc))}", file=sys.stderr)
        return 1


def _replay(cfg: BridgeConfig, args: argparse.Namespace) -> int:
    import asyncio

    from bridge.archive_reader import ReadLimits
    from bridge.replay import Replayer, ReplayOptions, parse_time
    from bridge.runtime import new_event_loop, setup_logging

    try:
        opts = ReplayOptions(
            source=args.source,
            since=parse_time(args.since) if args.since else None,
            until=parse_time(args.until) if args.until else None,
            route=args.route,
            topic_filter=args.topic_filter,
            rate=args.rate,
            to_source_topic=args.to_source_topic,
            dry_run=args.dry_run,
            progress_every=args.progress_every,
            limits=ReadLimits(int(args.max_record_bytes), int(args.max_object_bytes)),
        )
        if opts.topic_filter:
            from bridge.routing import TopicFilter

            TopicFilter.parse(opts.topic_filter)
    except ValueError as exc:
        raise ConfigError([f"replay: {exc}"]) from None
    if opts.progress_every < 0:
        raise ConfigError(["replay: --progress-every must be 0 or more seconds"])
    setup_logging(cfg.log.format, "warning", direction=cfg.direction, instance=cfg.instance_id)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        try:
            summary = runner.run(Replayer(cfg, opts).run())
        except ValueError as exc:
            raise ConfigError([f"replay: {exc}"]) from None
    print("\n".join(summary.lines()))
    if summary.gave_up:
        print(f"error: replay: {summary.gave_up}", file=sys.stderr)
        return 2
    return 1 if summary.errors or summary.rejected or summary.bad_records else 0


def _sessions(cfg: BridgeConfig, args: argparse.Namespace) -> int:
    import asyncio
    import time

    from bridge.runtime import new_event_loop, setup_logging
    from bridge.sessions import Unreachable, adopt_session, format_sessions, list_sessions

    # `sessions` prints a table: retries of its one connection are not news.
    level = "error" if args.command == "sessions" else "warning"
    setup_logging(cfg.log.format, level, direction=cfg.direction, instance=cfg.instance_id)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        try:
            if args.command == "sessions":
                seen = runner.run(list_sessions(cfg))
                print("\n".join(format_sessions(seen, time.time())))
                gone = [s for s in seen if s.record is not None and s.record.state == "gone"]
                return 1 if gone else 0
            done = runner.run(adopt_session(cfg, args.client_id))
        except Unreachable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 3
    if done:
        print(f"adopted {args.client_id}: drained, session ended, record cleared")
        return 0
    print(f"error: {args.client_id}: not finished; the session is kept", file=sys.stderr)
    return 1


def _sync_retained(cfg: BridgeConfig, args: argparse.Namespace) -> int:
    import asyncio

    from bridge.retained import RetainedSync, SyncOptions, SyncSummary, select_routes
    from bridge.runtime import new_event_loop, setup_logging

    if args.quiet <= 0 or args.timeout <= 0:
        raise ConfigError(["sync-retained: --quiet and --timeout must be positive"])
    try:
        select_routes(cfg, args.route)
    except ValueError as exc:
        raise ConfigError([f"sync-retained: {exc}"]) from None
    opts = SyncOptions(args.route, args.dry_run, args.quiet, args.timeout)
    setup_logging(cfg.log.format, "warning", direction=cfg.direction, instance=cfg.instance_id)

    async def sync() -> SyncSummary:
        return await RetainedSync(cfg, opts).run()

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        summary = runner.run(sync())
    print("\n".join(summary.lines()))
    return 0 if summary.ok else 1


def _cohort(cfg: BridgeConfig, route: str | None, devices: list[str]) -> int:
    """One line per device: id, position (the percent from which it is in), in|out, why."""
    from bridge.cohort import position

    gated = [r for r in cfg.routes if r.cohort is not None and route in (None, r.label, r.source)]
    if len(gated) != 1:
        have = ", ".join(r.label for r in cfg.routes if r.cohort is not None) or "none"
        which = f"--route {route!r} names no route" if route else "name one with --route"
        raise ConfigError([f"cohort: {which} with a cohort (routes with one: {have})"])
    assert gated[0].cohort is not None
    cohort = gated[0].cohort.cohort
    for device in devices or (line.strip() for line in sys.stdin):
        if device:
            verdict = "in" if device in cohort else "out"
            print(f"{device}\t{position(device):.6f}\t{verdict}\t{cohort.why(device)}")
    return 0


def _check(paths: list[str], quiet: bool, strict: bool = False) -> int:
    configs: dict[str, BridgeConfig] = {}
    problems: list[str] = []
    for path in paths:
        try:
            configs[path] = load_config(path)
        except ConfigError as exc:
            # A variable's problem is the same for every file: named once.
            problems += located(path, exc.problems)
    problems += cross_check(configs)
    warnings = [f"{path}: {w}" for path, cfg in configs.items() for w in sizing_problems(cfg)]
    if strict:
        problems, warnings = problems + warnings, []
    if problems:
        for problem in dict.fromkeys(problems):
            print(f"error: {problem}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not quiet:
        from_env = sorted(bridge_variables(os.environ).values())
        for path, cfg in configs.items():
            print(f"# {path}: ok (effective configuration, secrets redacted)")
            for side, ids in cfg.client_ids().items():
                shown = ids if len(ids) <= 4 else [*ids[:2], "…", ids[-1]]
                print(f"# {side} client ids ({len(ids)}): {', '.join(shown)}")
            if from_env:
                print(f"# set by the environment: {', '.join(from_env)}")
            print(yaml.safe_dump(cfg.effective(), sort_keys=False), end="")
    return 0
