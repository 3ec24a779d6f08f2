"""URLs the user gives us: validated once, and never shown with their secrets.

Every message that echoes a URL goes through ``redact_url``: a URL that is wrong in
one way (a bad port) may still carry a password, and the error line is read by people
and collected by log pipelines. Pure functions, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

MASK = "***"


def redact_url(text: str) -> str:
    """``text`` with everything up to its last '@' (the userinfo) replaced by ``***``.

    Deliberately crude: a password may hold '/', ':' or '@', and the URL may be broken
    in any other way, so no parser decides what is secret here.
    """
    at = text.rfind("@")
    if at < 0:
        return text
    start = text.find("//")
    start = start + 2 if 0 <= start < at else 0
    return text[:start] + MASK + text[at:]


@dataclass(frozen=True, slots=True)
class BrokerUrl:
    scheme: str
    host: str
    port: int

    @property
    def is_tls(self) -> bool:
        return self.scheme == "mqtts"


DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


def _split(text: str) -> SplitResult:
    try:
        return urlsplit(text)
    except ValueError as exc:  # e.g. an unbalanced '[' in the host
        raise ValueError(f"not a URL: {redact_url(text)!r} ({exc})") from None


def _printable(text: str, shown: str) -> None:
    # urlsplit silently drops tabs and newlines: refuse them instead of guessing.
    if any(c.isspace() or not c.isprintable() for c in text):
        raise ValueError(f"whitespace or a control character in {shown!r}")


def _port(parts: SplitResult, shown: str) -> int | None:
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in {shown!r}: use 1-65535") from None
    if port == 0:
        raise ValueError(f"port 0 in {shown!r}: use 1-65535, or omit the port for the default")
    return port


def parse_broker_url(text: str) -> BrokerUrl:
    """Validate ``mqtt[s]://host[:port]``; every error names what to use instead."""
    shown = redact_url(text)
    _printable(text, shown)
    parts = _split(text)
    if parts.scheme not in DEFAULT_PORTS:
        raise ValueError(f"scheme must be mqtt:// or mqtts://, got {shown!r}")
    # Credentials never travel in the URL: they would be printed, logged and scraped.
    # Any '@' counts: a password holding '/' or '?' would hide from urlsplit.
    if "@" in text:
        if ":" in text[text.find("//") + 1 : text.rfind("@")]:
            raise ValueError("no password in the URL: use password_file")
        raise ValueError("no user name in the URL: use username (and password_file)")
    if not parts.hostname:
        raise ValueError(f"no host in {shown!r}")
    port = _port(parts, shown)
    if parts.path not in ("", "/"):
        raise ValueError(f"unexpected path {parts.path!r} in the URL")
    if parts.query or parts.fragment or text.rstrip("/").endswith(("?", "#")):
        raise ValueError(
            f"unexpected query or fragment in {shown!r}: "
            "every setting has its own key (username, tls, limits, …)"
        )
    return BrokerUrl(parts.scheme, parts.hostname, port or DEFAULT_PORTS[parts.scheme])


def check_endpoint_url(text: str) -> str:
    """An S3 endpoint: ``http[s]://host[:port]`` with no credentials in it."""
    shown = redact_url(text)
    _printable(text, shown)
    parts = _split(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"scheme must be http:// or https://, got {shown!r}")
    if "@" in text:  # anywhere: a password holding '/' would hide from urlsplit
        raise ValueError(
            "no credentials in the URL: S3 credentials come from the AWS chain "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, shared files, or the task role)"
        )
    if not parts.hostname:
        raise ValueError(f"no host in {shown!r}")
    _port(parts, shown)
    if parts.query or parts.fragment:
        raise ValueError(f"unexpected query or fragment in {shown!r}")
    from botocore.utils import is_valid_endpoint_url, is_valid_ipv6_endpoint_url

    if not (is_valid_endpoint_url(text) or is_valid_ipv6_endpoint_url(text)):
        raise ValueError(f"not a valid endpoint URL: {shown!r}")
    return text


def check_region(text: str) -> str:
    """An AWS region name as botocore accepts it (it fails only when the client is made)."""
    from botocore.exceptions import InvalidRegionError
    from botocore.utils import validate_region_name

    try:
        validate_region_name(text)
    except InvalidRegionError:
        raise ValueError(f"not a region name: {text!r} (for example eu-west-1)") from None
    return text
