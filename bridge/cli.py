"""Command line: argument parsing only. User errors are one line each, never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import yaml

from bridge import __version__
from bridge.config import BridgeConfig, cross_check, load_config
from bridge.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mqtt-bridge",
        description="Republish MQTT between a device broker and AWS IoT Core, at least once.",
    )
    parser.add_argument("--version", action="version", version=f"mqtt-bridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run one worker")
    run.add_argument("--config", required=True, metavar="FILE")
    check = sub.add_parser(
        "check", help="validate configuration files (with loop checks across them) and print them"
    )
    check.add_argument("--config", required=True, nargs="+", metavar="FILE")
    check.add_argument("--quiet", "-q", action="store_true", help="print only problems")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check":
            return _check(args.config, args.quiet)
        cfg = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    from bridge.runtime import run_worker

    try:
        return run_worker(cfg)
    except KeyboardInterrupt:
        return 130


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
