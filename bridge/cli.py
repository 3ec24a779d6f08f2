"""Command line: argument parsing only. User errors are one line each, never a traceback."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

import yaml

from bridge import __version__
from bridge.config import BridgeConfig, cross_check, load_config
from bridge.errors import ConfigError


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
            return _check(args.config, args.quiet)
        cfg = load_config(args.config)
        if args.command == "replay":
            return _replay(cfg, args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    from bridge.runtime import run_worker

    try:
        return run_worker(cfg, args.log_format)
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
            limits=ReadLimits(int(args.max_record_bytes), int(args.max_object_bytes)),
        )
        if opts.topic_filter:
            from bridge.routing import TopicFilter

            TopicFilter.parse(opts.topic_filter)
    except ValueError as exc:
        raise ConfigError([f"replay: {exc}"]) from None
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


def _check(paths: list[str], quiet: bool) -> int:
    configs: dict[str, BridgeConfig] = {}
    problems: list[str] = []
    for path in paths:
        try:
            configs[path] = load_config(path)
        except ConfigError as exc:
            problems += [p if p.startswith(path) else f"{path}: {p}" for p in exc.problems]
    problems += cross_check(configs)
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    if not quiet:
        for path, cfg in configs.items():
            print(f"# {path}: ok (effective configuration, secrets redacted)")
            print(yaml.safe_dump(cfg.redacted(), sort_keys=False), end="")
    return 0
