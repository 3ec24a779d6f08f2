"""Process lifecycle: logging setup, the event loop, signals and the drain deadline."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Any

import orjson
import structlog

from bridge.config import BridgeConfig


def setup_logging(fmt: str = "json", level: str = "info", **context: Any) -> None:
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        factory: Any = structlog.PrintLoggerFactory(sys.stderr)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        factory = structlog.BytesLoggerFactory(sys.stderr.buffer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
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


def run_worker(cfg: BridgeConfig, log_format: str | None = None) -> int:
    """Run one worker until SIGTERM/SIGINT; 0 after a graceful leave."""
    setup_logging(
        log_format or cfg.log.format,
        cfg.log.level,
        direction=cfg.direction,
        instance=cfg.instance_id,
    )
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(_main(cfg))


async def _main(cfg: BridgeConfig) -> int:
    from bridge.pipeline import Bridge  # the event loop must exist first

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
    async with Bridge(cfg) as bridge:
        await bridge.serve(stop)
    return 0
