"""`mqtt-bridge sessions` and `mqtt-bridge adopt`: the member registry for operators.

``sessions`` lists the member records on the source broker (every direction): which
worker holds which source session, live or gone, and how old the record is.
``adopt`` drains and ends one session by hand (the scale-in runbook, an ECS task that
came back under a new id) through the same routes and end-to-end acknowledgement as a
worker, then clears its record.

Exit codes: 0 done (``sessions``: nothing is waiting for adoption); 1 ``sessions``: some
session is gone and not yet adopted, ``adopt``: it could not finish (the session is
kept); 2 bad configuration; 3 the source broker cannot be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from bridge.config import BridgeConfig
from bridge.errors import ConnectionFailed
from bridge.membership import MemberRecord, RegistryLink, member_topic
from bridge.mqtt import MqttConnection
from bridge.wiring import clean_session, endpoint_of

QUIET = 0.5  # retained records arrive right after SUBACK; this long without one: all seen


@dataclass(frozen=True, slots=True)
class Seen:
    topic: str
    direction: str
    client_id: str
    record: MemberRecord | None  # None: not a record of ours (shown as unreadable)


class Unreachable(Exception):
    """The source broker did not accept the registry connection."""


@contextlib.asynccontextmanager
async def _registry(cfg: BridgeConfig, seen: list[Seen]) -> AsyncIterator[RegistryLink]:
    root = cfg.membership.topic_root
    src = cfg.source

    def on_record(topic: str, payload: bytes, retained: bool) -> None:
        parts = topic[len(root) + 1 :].split("/")
        if payload and len(parts) == 2:
            seen.append(Seen(topic, parts[0], parts[1], MemberRecord.decode(payload)))

    options = clean_session(
        cfg, "source", f"{cfg.instance_id}-sessions-{int(time.time() * 1000) % 100000}"
    )
    link = RegistryLink(
        endpoint_of(src), options, src.connect_timeout, f"{root}/+/+", on_record, MqttConnection
    )
    runner = asyncio.create_task(link.run())
    try:
        try:
            async with asyncio.timeout(src.connect_timeout + 1):
                await link.ready.wait()
        except TimeoutError:
            why = link.problem or f"no answer within {src.connect_timeout + 1:g} s"
            raise Unreachable(f"cannot reach the source broker: {why}") from None
        count = -1
        while count != len(seen):  # until no record arrived for QUIET
            count = len(seen)
            await asyncio.sleep(QUIET)
        yield link
    finally:
        await link.close()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionFailed):
            await runner


async def list_sessions(cfg: BridgeConfig) -> list[Seen]:
    seen: list[Seen] = []
    async with _registry(cfg, seen):
        pass
    return sorted(seen, key=lambda s: (s.direction, s.client_id))


def format_sessions(seen: list[Seen], now: float) -> list[str]:
    lines = [
        f"{'direction':<9} {'client id':<40} {'state':<8} {'instance':<24} {'age':>7}  version"
    ]
    for s in seen:
        r = s.record
        if r is None:
            lines.append(f"{s.direction:<9} {s.client_id:<40} {'?':<8} (unreadable record)")
            continue
        age = f"{now - r.updated:.0f}s"
        row = f"{s.direction:<9} {s.client_id:<40} {r.state:<8} {r.instance:<24} {age:>7}"
        lines.append(f"{row}  {r.version}")
    gone = sum(1 for s in seen if s.record is not None and s.record.state == "gone")
    lines.append(f"{len(seen)} sessions, {gone} gone (waiting for adoption)")
    return lines


async def adopt_session(cfg: BridgeConfig, client_id: str) -> bool:
    """Drain and end ``client_id``'s session through ``cfg``'s routes; clear its record."""
    from bridge.pipeline import Bridge

    async with Bridge(cfg, worker=False) as bridge:
        done = await bridge.adopt(client_id)
    if done:
        seen: list[Seen] = []
        async with _registry(cfg, seen) as link:
            await link.publish(
                member_topic(cfg.membership.topic_root, cfg.direction, client_id), b""
            )
    return done
