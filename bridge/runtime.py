"""Process lifecycle: logging setup, the event loop, signals and the drain deadline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any

import orjson
import structlog

from bridge.config import BridgeConfig


class _LevelFilter:
    """The log level as a processor holding a threshold, not a filtering logger class:
    loggers bound before a live reload (every component binds its own) follow the new
    level too. There are no debug lines on the hot path, so filtering here costs nothing."""

    def __init__(self) -> None:
        self.threshold = logging.INFO

    def __call__(self, logger: Any, method: str, event: Any) -> Any:
        if _LEVELS.get(method, logging.CRITICAL) < self.threshold:
            raise structlog.DropEvent
        return event


_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}
_level_filter = _LevelFilter()


def set_log_level(level: str) -> None:
    """Change the level of every logger, including those already bound (live reload)."""
    _level_filter.threshold = _LEVELS[level]


def setup_logging(fmt: str = "json", level: str = "info", **context: Any) -> None:
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        factory: Any = structlog.PrintLoggerFactory(sys.stderr)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        factory = structlog.BytesLoggerFactory(sys.stderr.buffer)
    set_log_level(level)
    structlog.configure(
        processors=[
            _level_filter,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**context)


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; platforms without it
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_worker(
    cfg: BridgeConfig, log_format: str | None = None, config_path: str | None = None
) -> int:
    """Run one worker until SIGTERM/SIGINT; 0 after a graceful leave. SIGHUP reloads
    ``config_path`` (``reload.py``)."""
    setup_logging(
        log_format or cfg.log.format,
        cfg.log.level,
        direction=cfg.direction,
        instance=cfg.instance_id,
    )
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(_main(cfg, config_path))


async def _main(cfg: BridgeConfig, config_path: str | None = None) -> int:
    from bridge.pipeline import Bridge  # the event loop must exist first
    from bridge.reload import Reloader

    log = structlog.get_logger()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.error("bridge.forced_exit", signal=signal.Signals(signum).name)
            os._exit(1)
        log.info("bridge.signal", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    log.info("bridge.start", loop=type(loop).__module__, config=cfg.redacted())
    from bridge.sizing import sizing_problems

    for problem in sizing_problems(cfg):
        log.warning("config.sizing", problem=problem)
    bridge = Bridge(cfg)
    reloader = None
    if config_path is not None:
        reloader = Reloader(config_path, cfg, bridge.routes, bridge.target, bridge.stats)
        # At once: SIGHUP's default action would end the process while it connects.
        loop.add_signal_handler(signal.SIGHUP, reloader.request)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(bridge)
        if reloader is not None:
            await stack.enter_async_context(reloader)
        await bridge.serve(stop)
    if bridge.failed is not None:
        print(f"error: {bridge.failed}", file=sys.stderr)
        return 2
    return 0
