"""Exceptions grouped by what the caller can do about them."""

from __future__ import annotations


class BridgeError(Exception):
    """Base of every error the bridge raises on purpose."""


class ConfigError(BridgeError):
    """The configuration is wrong: fix it and start again. One problem per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class ConnectionFailed(BridgeError):
    """A broker could not be reached or dropped us: retry with backoff."""


class ConnectRefused(ConnectionFailed):
    """The broker answered CONNACK with a failure reason code."""

    def __init__(self, reason_code: int, reason: str, detail: str = "") -> None:
        text = f"connection refused: {reason} (0x{reason_code:02x})"
        super().__init__(f"{text}; {detail}" if detail else text)
        self.reason_code = reason_code


class ProtocolViolation(ConnectionFailed):
    """The peer broke the MQTT protocol; the connection is dropped and retried.

    ``reason`` is the metric label (``protocol_errors_total{reason}``)."""

    def __init__(self, message: str, reason: str = "malformed_packet") -> None:
        super().__init__(message)
        self.reason = reason


class StartupError(ConfigError):
    """Something only the start can find out (a port in use): one line, exit 2."""

    def __init__(self, problem: str) -> None:
        super().__init__([problem])


class PacketTooLarge(BridgeError):
    """A message the target announced it cannot take: dead-letter it, do not retry."""
