"""What a graceful leave does with each source session: a pure decision.

Shared subscriptions have other members who take the traffic once we unsubscribe, so
a leaving worker gives them up and ends its session when drained. A plain subscription
has no one else: unsubscribing it would drop everything published until the worker is
back, so its session (with the subscription) stays and a restart resumes it — a planned
restart is then never worse than ``kill -9``. ``shutdown.session`` overrides the
choice: ``keep`` keeps every session and subscription (a restart is coming), ``end``
gives everything up (the worker leaves for good and nothing plain must wait for it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SessionMode = Literal["auto", "keep", "end"]


def is_shared(subscription: str) -> bool:
    return subscription.startswith("$share/")


@dataclass(frozen=True, slots=True)
class LinkLeave:
    """The leave of one source connection."""

    unsubscribe: tuple[str, ...]  # filters to give up before draining
    keep_session: bool  # keep the session (and what stays subscribed) for the next start
    why: str

    @property
    def action(self) -> str:
        return "kept the session" if self.keep_session else "ended the session"


def plan_leave(mode: SessionMode, subscriptions: list[str]) -> LinkLeave:
    shared = tuple(s for s in subscriptions if is_shared(s))
    plain = [s for s in subscriptions if not is_shared(s)]
    if mode == "keep":
        return LinkLeave((), True, "shutdown.session is keep: a restart resumes the session")
    if mode == "end":
        return LinkLeave(
            tuple(subscriptions), False, "shutdown.session is end: this worker leaves for good"
        )
    if plain:
        return LinkLeave(
            shared,
            True,
            "a plain subscription has no other consumer: the session keeps what is published "
            "until this instance_id is back (or a live worker adopts it)",
        )
    return LinkLeave(
        shared, False, "shared subscriptions only: the other members of the group take over"
    )


MemberState = Literal["stopped", "gone"]


@dataclass(frozen=True, slots=True)
class LinkExit:
    """How one source connection ends, once the drain is over."""

    end_session: bool  # DISCONNECT with session expiry 0 (MQTT 5)
    with_will: bool  # DISCONNECT 0x04: the broker declares us gone after the grace
    record: MemberState | None  # our final member record; None clears it
    action: str
    why: str


def plan_exit(plan: LinkLeave, drained: bool, v5: bool) -> LinkExit:
    if not drained:
        # Stranded otherwise (a scale-in while the target is down): mark it gone now,
        # so that a live worker adopts it unless this instance_id is back first.
        return LinkExit(
            False,
            False,
            "gone",
            "kept the session",
            "not drained within shutdown.deadline: the unfinished messages wait in it, "
            "and a live worker adopts it unless this instance_id is back first",
        )
    if not plan.keep_session:
        if v5:
            return LinkExit(True, False, None, plan.action, plan.why)
        return LinkExit(
            False,
            False,
            None,
            "kept the session",
            "MQTT 3.1.1 cannot end a session on DISCONNECT (it holds no subscription now)",
        )
    # Kept for the next start; if that never comes (scale-in), the Will after the grace
    # lets a live worker adopt it (MQTT 5: 3.1.1 has no delayed Will).
    return LinkExit(False, v5, "stopped", plan.action, plan.why)
