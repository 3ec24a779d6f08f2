"""Device cohorts: which devices a route carries during a rollout. Pure, no I/O but reading
the id lists.

Membership is a function of the device id alone, so every worker, every restart and
every version of the bridge agrees on it, and a device is in or out as a whole:

    point(id) = the first 8 bytes of SHA-256(id as UTF-8), as a big-endian unsigned integer
    in(id)    = id not in exclude and (id in include or point(id) / 2**64 < percent / 100)

Raising ``percent`` only ever adds devices: the devices of a smaller cohort are those
whose point lies below a lower threshold. SHA-256 (not Python's ``hash``, which is
salted per process) is the contract: changing it would reshuffle every rollout, so
``tests/test_cohort.py`` pins known ids to their points.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from bridge.routing import TopicFilter, TopicTemplate

_SPACE = 2**64


def point(device: str) -> int:
    """Where a device sits on the cohort line, 0 ≤ point < 2**64."""
    return int.from_bytes(hashlib.sha256(device.encode()).digest()[:8], "big")


def position(device: str) -> float:
    """``point`` as a percentage, 0 ≤ position < 100: the device is in every cohort above it."""
    return point(device) * 100 / _SPACE


def read_device_list(path: Path) -> frozenset[str]:
    """Device ids, one per line; ``#`` starts a comment, blank lines are ignored.

    ``#`` cannot be part of a device id: a topic name never contains it (MQTT 4.7.1).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    ids = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return frozenset(device for device in ids if device)


@dataclass(frozen=True, slots=True)
class Cohort:
    percent: float
    include: frozenset[str] = frozenset()
    exclude: frozenset[str] = frozenset()

    def __contains__(self, device: object) -> bool:
        if not isinstance(device, str) or device in self.exclude:
            return False
        # point * 100 < percent * 2**64, exactly: an int compared with a float is exact in
        # Python, and percent * 2**64 only shifts the exponent. No rounding can make a
        # device leave when percent grows.
        return device in self.include or point(device) * 100 < self.percent * _SPACE

    def why(self, device: str) -> str:
        """Why a device is in or out: ``exclude_file``, ``include_file`` or ``percent``."""
        if device in self.exclude:
            return "exclude_file"
        return "include_file" if device in self.include else "percent"


@dataclass(frozen=True, slots=True)
class CohortGate:
    """A route's cohort, applied to its topics: the device key comes from the captures."""

    filter: TopicFilter
    device: TopicTemplate
    cohort: Cohort

    def device_of(self, topic: str) -> str | None:
        captures = self.filter.captures(topic)
        if captures is None:
            return None
        parts = self.device.parts
        if len(parts) == 1 and isinstance(parts[0], int) and parts[0] >= 0:
            return captures[parts[0]]  # the usual "{1}": no string building
        return self.device.render(topic, captures)

    def admits(self, topic: str) -> bool:
        """True when the topic's device is in the cohort."""
        device = self.device_of(topic)
        return device is not None and device in self.cohort
