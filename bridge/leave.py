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
