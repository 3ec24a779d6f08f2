"""Configuration: one settings root, nested sections, validated and frozen at start.

Sources, strongest first: ``BRIDGE_…`` environment variables (``__`` nests), then the
YAML file. Secrets are never inline: ``password_file`` names a file that is read here.
"""

from __future__ import annotations

import json
import os
import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from bridge.cohort import Cohort, CohortGate, read_device_list
from bridge.errors import ConfigError
from bridge.limits import (
    AWS_CLIENT_ID_MAX,
    AWS_IOT_LIMITS,
    AWS_KEEPALIVE_RANGE,
    MQTT_MAX_PACKET,
    MQTT_MIN_PACKET,
    TARGET_PACKET_LIMIT,
    TopicLimits,
    source_packet_limit,
)
from bridge.loader import ENV_ORIGIN, read_yaml, unknown_variables, variable_for, variables_inside
from bridge.routing import (
    ONE,
    TopicFilter,
    TopicTemplate,
    filter_pattern,
    patterns_overlap,
    plan_subscriptions,
    template_pattern,
)
from bridge.tls import client_context
from bridge.urls import BrokerUrl, check_endpoint_url, check_region, parse_broker_url, redact_url

HOP_MARKER = "mqtt-bridge-hop"
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
# Infinity and NaN are never a setting: `connect_timeout: .inf` would wait forever.
_FROZEN = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
# Every duration is finite and bounded (`le=`): every wait in the bridge ends.
# MQTT strings (client id, user name, password) carry a two-byte length.
MQTT_STRING_MAX = 65535


def _mqtt_string(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    if "\x00" in value:
        raise ValueError(f"{what} contains a NUL character (MQTT-1.5.4-2)")
    size = len(value.encode())
    if size > MQTT_STRING_MAX:
        raise ValueError(f"{what} is {size} bytes: MQTT allows at most {MQTT_STRING_MAX}")
    return value


class Section(BaseModel):
    model_config = _FROZEN


def _readable(path: Path) -> Path:
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    return path


ReadableFile = Annotated[Path, AfterValidator(_readable)]


def _read_password(path: Path) -> bytes:
    """The password file's bytes, without a trailing newline. MQTT passwords are binary
    data, so nothing is decoded: an error here could only show a secret byte."""
    try:
        secret = path.read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    if len(secret) > MQTT_STRING_MAX:
        raise ValueError(f"password_file {path}: longer than MQTT's {MQTT_STRING_MAX} bytes")
    return secret


def _broker_url(value: str) -> str:
    parse_broker_url(value)  # every error names what to use instead, with secrets masked
    return value


UrlText = Annotated[str, AfterValidator(_broker_url)]


def url_host(url: str) -> str:
    return parse_broker_url(url).host


def url_port(url: str) -> int:
    return parse_broker_url(url).port


def url_address(url: str) -> str:
    return f"{url_host(url).lower()}:{url_port(url)}"


class TlsConfig(Section):
    ca_file: ReadableFile | None = None  # default: the system's CA bundle
    cert_file: ReadableFile | None = None
    key_file: ReadableFile | None = None
    alpn: list[str] = []  # e.g. ["x-amzn-mqtt-ca"] for X.509 on port 443
    server_name: str | None = None  # SNI and the name verified; default the URL's host
    _context: ssl.SSLContext | None = PrivateAttr(default=None)

    @field_validator("alpn")
    @classmethod
    def _check_alpn(cls, value: list[str]) -> list[str]:
        for name in value:
            # TLS carries each protocol name with a one-byte length (RFC 7301).
            if not name or len(name.encode()) > 255 or not name.isascii():
                raise ValueError(
                    f"each protocol is 1-255 ASCII characters, got {name[:40]!r}"
                    + ("…" if len(name) > 40 else "")
                )
        return value

    @model_validator(mode="after")
    def _build(self) -> TlsConfig:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file")
        self._context = client_context(self.ca_file, self.cert_file, self.key_file, self.alpn)
        return self

    @property
    def context(self) -> ssl.SSLContext:
        assert self._context is not None
        return self._context


class LimitsConfig(Section):
    """Per-connection limits of one broker; ``profile`` fills them, keys here override."""

    publish_rate: Annotated[float, Field(gt=0, le=1e9)] | None = None
    bytes_rate: Annotated[float, Field(gt=0, le=1e12)] | None = None
    burst: Annotated[float, Field(gt=0, le=1)] = 1.0
    inflight: Annotated[int, Field(ge=1, le=65535)] | None = None
    max_payload: Annotated[int, Field(ge=1)] | None = None
    max_topic_bytes: Annotated[int, Field(ge=1)] | None = None
    max_topic_slashes: Annotated[int, Field(ge=0)] | None = None
    subscriptions_per_connection: Annotated[int, Field(ge=1)] | None = None
    filters_per_subscribe: Annotated[int, Field(ge=1)] | None = None
    connect_interval: Annotated[float, Field(ge=0, le=3600)] = 0.0
    max_qos: Literal[0, 1] = 1

    def topic_limits(self) -> TopicLimits:
        return TopicLimits(self.max_payload, self.max_topic_bytes, self.max_topic_slashes)


class BrokerConfig(Section):
    url: str
    protocol: Literal["5", "3.1.1"] = "5"
    profile: Literal["generic", "aws-iot"] = "generic"
    session_expiry: Annotated[int, Field(ge=0, le=0xFFFFFFFF)] = 300
    keepalive: Annotated[int, Field(ge=0, le=65535)] = 60
    client_id: str | None = None
    username: str | None = None
    password_file: ReadableFile | None = None
    _password: SecretStr | None = PrivateAttr(default=None)
    connect_timeout: Annotated[float, Field(gt=0, le=300)] = 10.0
    # The largest packet this broker may send us: announced in CONNECT (MQTT 5), and
    # no read buffers more. None: derived from the limits (BridgeConfig.packet_limit).
    max_packet_size: Annotated[int, Field(ge=MQTT_MIN_PACKET, le=MQTT_MAX_PACKET)] | None = None
    tls: TlsConfig | None = None
    limits: LimitsConfig = LimitsConfig()
    # Disaster recovery: where to go when `url` cannot be reached (failover.py has the rules).
    failover_urls: list[UrlText] = []
    failover_after: Annotated[float, Field(gt=0)] = 10.0
    failback_after: Annotated[float, Field(gt=0)] | None = 60.0

    @model_validator(mode="before")
    @classmethod
    def _apply_profile(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("profile") == "aws-iot":
            given = data.get("limits") or {}
            if isinstance(given, dict):
                data = {**data, "limits": {**AWS_IOT_LIMITS, **given}}
        return data

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_as_text(cls, value: Any) -> Any:
        # YAML reads `protocol: 5` as an int.
        return str(value) if isinstance(value, int | float) else value

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return _broker_url(value)

    @field_validator("client_id")
    @classmethod
    def _check_client_id(cls, value: str | None) -> str | None:
        if value == "":
            raise ValueError("empty: omit client_id for the default")
        return _mqtt_string(value, "the client id")

    @field_validator("username")
    @classmethod
    def _check_username(cls, value: str | None) -> str | None:
        return _mqtt_string(value, "the user name")

    @model_validator(mode="after")
    def _check(self) -> BrokerConfig:
        if self.password_file is not None:
            # MQTT passwords are binary: kept byte for byte (surrogateescape), never decoded
            # in a way that could fail and print a byte of it.
            secret = _read_password(self.password_file).decode("utf-8", "surrogateescape")
            self._password = SecretStr(secret)
        if self.password_file is not None and self.username is None and self.protocol == "3.1.1":
            raise ValueError("password_file needs username with MQTT 3.1.1 (MQTT-3.1.2-22)")
        if self.tls is not None and not self.is_tls:
            # Never a silent plaintext connection when TLS settings were given.
            raise ValueError("tls is set but the url is mqtt://: use mqtts://")
        scheme = parse_broker_url(self.url).scheme
        for i, other in enumerate(self.failover_urls):
            if parse_broker_url(other).scheme != scheme:
                raise ValueError(
                    f"failover_urls[{i}]: {other!r} must use {scheme}:// like url "
                    "(one tls section serves every url)"
                )
        addresses = self.addresses
        if len(set(addresses)) != len(addresses):
            raise ValueError("failover_urls: each url must name a different host:port")
        if self.profile == "aws-iot":
            low, high = AWS_KEEPALIVE_RANGE
            if not self.is_tls:
                raise ValueError("profile aws-iot needs an mqtts:// url (AWS IoT Core is TLS only)")
            if not low <= self.keepalive <= high:
                raise ValueError(f"keepalive {self.keepalive}: AWS IoT Core accepts {low}–{high} s")
        return self

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.is_tls:
            return None
        return self.tls.context if self.tls is not None else client_context(None, None, None, [])

    @property
    def server_name(self) -> str:
        return (self.tls.server_name if self.tls else None) or self.host

    @property
    def password(self) -> SecretStr | None:
        return self._password

    @property
    def parsed_url(self) -> BrokerUrl:
        return parse_broker_url(self.url)

    @property
    def host(self) -> str:
        return self.parsed_url.host

    @property
    def port(self) -> int:
        return self.parsed_url.port

    @property
    def is_tls(self) -> bool:
        return self.parsed_url.is_tls

    @property
    def address(self) -> str:
        return url_address(self.url)

    @property
    def urls(self) -> list[str]:
        """``url`` first, then the failover urls, in the order they are tried."""
        return [self.url, *self.failover_urls]

    @property
    def addresses(self) -> list[str]:
        return [url_address(url) for url in self.urls]

    def server_name_of(self, url: str) -> str:
        """SNI and the verified name for one of ``urls``: tls.server_name, else its host."""
        return (self.tls.server_name if self.tls else None) or url_host(url)

    def client_id_base(self, default: str) -> str:
        return self.client_id or default


class SourceConfig(BrokerConfig):
    # Connections that each join the same share groups: a broker that caps every
    # connection (AWS IoT Core: 100 publishes/s) serves one worker N times as fast.
    connections: Annotated[int, Field(ge=1, le=100)] = 1


class TargetConfig(BrokerConfig):
    connections: Annotated[int, Field(ge=1, le=1000)] = 1
    session_expiry: Annotated[int, Field(ge=0, le=0xFFFFFFFF)] = 0
    # An empty QoS 1 publish that proves the path before a released share is taken
    # back; the target's ACL (an IoT Core policy) must allow it. {instance_id} is replaced.
    probe_topic: str = "mqtt-bridge/probe/{instance_id}"

    @field_validator("probe_topic")
    @classmethod
    def _check_probe_topic(cls, value: str) -> str:
        if not value or any(c in value for c in "+#\x00"):
            raise ValueError("a topic name without wildcards")
        return value


class CohortConfig(Section):
    """The devices a copy route carries: a stable share of them, plus and minus lists."""

    percent: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
    include_file: ReadableFile | None = None  # ids always in (one per line, # comments)
    exclude_file: ReadableFile | None = None  # ids never in; wins over include_file
    _cohort: Cohort | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _read_lists(self) -> CohortConfig:
        lists = {}
        for key in ("include_file", "exclude_file"):
            path = getattr(self, key)
            try:
                lists[key] = read_device_list(path) if path is not None else frozenset()
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        self._cohort = Cohort(self.percent, lists["include_file"], lists["exclude_file"])
        return self

    @property
    def cohort(self) -> Cohort:
        assert self._cohort is not None
        return self._cohort


class RouteConfig(Section):
    source: str
    share_group: str | None = None
    target: str = "{topic}"
    qos: Literal[0, 1] = 1
    retain: bool = True
    name: str | None = None
    # Give the share back after this many seconds without any target connection
    # (bridge/release.py); only for a share group that has other consumers.
    release_when_target_down: Annotated[float, Field(gt=0, le=86400)] | None = None
    # takeover: consume in the legacy consumers' share group (take their messages);
    # copy: consume on the bridge's own subscription, the legacy consumers keep theirs.
    mode: Literal["takeover", "copy"] = "takeover"
    device: str | None = None  # the device key, from the captures: "{1}"
    cohort: CohortConfig | None = None

    @field_validator("qos", mode="before")
    @classmethod
    def _no_qos2(cls, value: Any) -> Any:
        if value == 2:
            raise ValueError("qos 2 is not supported: the bridge delivers at least once; use 1")
        return value

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str) -> str:
        TopicFilter.parse(value)
        return value

    @field_validator("share_group")
    @classmethod
    def _check_share_group(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c in value for c in "/+#\x00")):
            raise ValueError("a share group name is non-empty and has no '/', '+' or '#'")
        return value

    @field_validator("target")
    @classmethod
    def _check_target(cls, value: str, info: ValidationInfo) -> str:
        source = info.data.get("source")
        if source is not None:
            TopicTemplate.parse(value, TopicFilter.parse(source))
        return value

    @model_validator(mode="after")
    def _release_needs_a_group(self) -> RouteConfig:
        if self.release_when_target_down is not None and not self.share_group:
            raise ValueError(
                "release_when_target_down needs a share_group: a plain subscription has "
                "no other consumer, so the broker would drop what is published meanwhile"
            )
        return self

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str | None, info: ValidationInfo) -> str | None:
        source = info.data.get("source")
        if value is not None and source is not None:
            try:
                TopicTemplate.parse(value, TopicFilter.parse(source))
            except ValueError as exc:
                raise ValueError(str(exc).replace("target topic", "device key")) from None
        return value

    @field_validator("cohort")
    @classmethod
    def _check_cohort(cls, value: CohortConfig | None, info: ValidationInfo) -> CohortConfig | None:
        if value is None:
            return value
        if info.data.get("mode") == "takeover":
            raise ValueError(
                "a cohort needs mode: copy. A takeover route takes its messages from the "
                "legacy consumers' share group, so the devices outside the cohort would "
                "reach no one"
            )
        if "device" in info.data and info.data["device"] is None:
            raise ValueError('a cohort needs device: the device key, e.g. device: "{1}"')
        return value

    @property
    def label(self) -> str:
        return self.name or self.source

    def gate(self) -> CohortGate | None:
        """The cohort applied to this route's topics, or None (every device)."""
        if self.cohort is None or self.device is None:
            return None
        topic_filter = TopicFilter.parse(self.source)
        device = TopicTemplate.parse(self.device, topic_filter)
        return CohortGate(topic_filter, device, self.cohort.cohort)

    @property
    def subscription(self) -> str:
        if self.share_group:
            return f"$share/{self.share_group}/{self.source}"
        return self.source


_HEARTBEAT_FIELDS = ("direction", "instance_id")


def _heartbeat_template(value: str) -> str:
    names = _PLACEHOLDER.findall(value)
    for name in names:
        if name not in _HEARTBEAT_FIELDS:
            raise ValueError(
                f"unknown placeholder {{{name}}}: use {{direction}} or {{instance_id}}"
            )
    literal = _PLACEHOLDER.sub("", value)
    if not value or "+" in literal or "#" in literal or "{" in literal or "}" in literal:
        raise ValueError(f"{value!r} is not a topic (no wildcards, balanced braces)")
    if value.startswith("$"):
        raise ValueError(f"{value!r}: topics starting with '$' are reserved")
    return value


class HeartbeatConfig(Section):
    """The end-to-end heartbeat (heartbeat.py): readiness that means "messages flow"."""

    enabled: bool = True
    interval: Annotated[float, Field(gt=0)] = 5.0
    stale_after: Annotated[float, Field(gt=0)] = 20.0
    # Published on the source broker; {direction} and {instance_id} are filled in.
    topic: Annotated[str, AfterValidator(_heartbeat_template)] = (
        "mqtt-bridge/heartbeat/{direction}/{instance_id}"
    )
    # Where it crosses to on the target: a topic the target's policy lets the bridge
    # publish and subscribe to. Default: `topic` (`topic`/crossed when both are one broker).
    target_topic: Annotated[str, AfterValidator(_heartbeat_template)] | None = None

    @model_validator(mode="after")
    def _stale_after_interval(self) -> HeartbeatConfig:
        if self.stale_after <= self.interval:
            raise ValueError(
                f"stale_after ({self.stale_after:g} s) must be longer than interval "
                f"({self.interval:g} s)"
            )
        return self


class FlowConfig(Section):
    max_inflight: Annotated[int, Field(ge=1, le=65535)] = 1000
    max_inflight_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024 * 1024
    # A QoS 0 message that finds the flow full (flow.WhenFull): `block` stops reading, so
    # TCP and the source broker's queue absorb the burst (as Mosquitto's bridge does);
    # `drop` drops it and counts it (dropped{reason="full"}), for freshness over delivery.
    qos0_when_full: Literal["block", "drop"] = "block"


class ShutdownConfig(Section):
    deadline: Annotated[float, Field(gt=0, le=3600)] = 20.0
    # After unsubscribing, the broker still flushes what it queued for our session;
    # the drain ends once nothing is in flight and nothing arrived for this long.
    quiet: Annotated[float, Field(gt=0, le=60)] = 0.5
    # What happens to each source session on a graceful leave (bridge/leave.py):
    # auto: shared subscriptions are given up and the session ended when drained; a
    # session with a plain subscription is kept for the next start. keep | end: always.
    session: Literal["auto", "keep", "end"] = "auto"

    @model_validator(mode="after")
    def _quiet_fits(self) -> ShutdownConfig:
        if self.quiet >= self.deadline:
            raise ValueError(f"quiet ({self.quiet:g} s) must be shorter than deadline")
        return self


class MembershipConfig(Section):
    """The member registry on the source broker (bridge/membership.py)."""

    enabled: bool = True
    # Will Delay Interval: a worker not back within this is declared gone and adopted.
    grace: Annotated[int, Field(ge=1, le=86400)] = 60
    refresh: Annotated[float, Field(ge=0.5, le=3600)] = 10.0  # seconds between record refreshes
    topic_root: str = "mqtt-bridge/members"
    # An adoption that has not drained the session by then gives up (the record stays
    # "gone", so the next worker in rank tries).
    adopt_timeout: Annotated[float, Field(gt=0, le=86400)] = 600.0

    @field_validator("topic_root")
    @classmethod
    def _check_root(cls, value: str) -> str:
        if not value or any(c in value for c in "+#\x00") or value.startswith(("/", "$")):
            raise ValueError("a topic without wildcards, not starting with '/' or '$'")
        return value.rstrip("/")


# The container image sets this to 0.0.0.0:9100: a default, which a config file's
# `http.listen` (even null) overrides, unlike a BRIDGE_HTTP__LISTEN variable.
DEFAULT_LISTEN_ENV = "MQTT_BRIDGE_DEFAULT_LISTEN"


def _default_listen() -> str:
    return os.environ.get(DEFAULT_LISTEN_ENV) or "127.0.0.1:9100"


class HttpConfig(Section):
    listen: str | None = Field(default_factory=_default_listen)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"expected HOST:PORT, got {value!r}")
        bare = host.removeprefix("[").removesuffix("]")
        if host.startswith("[") != host.endswith("]") or any(
            c.isspace() or c in "/[]@" or not c.isprintable() for c in bare
        ):
            raise ValueError(f"expected HOST:PORT (an address or a name), got {value!r}")
        return value

    @property
    def host_port(self) -> tuple[str, int] | None:
        if not self.listen:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]") or "0.0.0.0", int(port)


class S3Config(Section):
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None  # MinIO or any S3-compatible store; default AWS
    region: str | None = None
    mode: Literal["required", "best_effort"] = "best_effort"
    flush_interval: Annotated[float, Field(gt=0, le=3600)] = 1.0
    max_batch_bytes: Annotated[int, Field(ge=1024)] = 8 * 1024 * 1024
    max_buffer_bytes: Annotated[int, Field(ge=1024)] = 256 * 1024 * 1024
    # Objects written at once. `required` mode also seals a batch once it holds
    # flow.max_inflight / (max_uploads + 1) messages (README "Sizing `required`").
    max_uploads: Annotated[int, Field(ge=1, le=64)] = 4

    @field_validator("endpoint_url")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        return None if value is None else check_endpoint_url(value)

    @field_validator("region")
    @classmethod
    def _check_region(cls, value: str | None) -> str | None:
        return None if value is None else check_region(value)

    @field_validator("prefix")
    @classmethod
    def _slash(cls, value: str) -> str:
        value = value.lstrip("/")
        return value if not value or value.endswith("/") else value + "/"


class BackupConfig(Section):
    s3: S3Config | None = None


class LogConfig(Section):
    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"
    stats_interval: Annotated[float, Field(gt=0, le=86400)] = 10.0


class BridgeConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BRIDGE_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
        allow_inf_nan=False,
    )

    instance_id: str = Field(default_factory=lambda: os.environ.get("HOSTNAME", ""))
    direction: Literal["dtb", "btd"]
    source: SourceConfig
    target: TargetConfig
    routes: Annotated[list[RouteConfig], Field(min_length=1)]
    heartbeat: HeartbeatConfig = HeartbeatConfig()
    flow: FlowConfig = FlowConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    membership: MembershipConfig = MembershipConfig()
    http: HttpConfig = HttpConfig()
    log: LogConfig = LogConfig()
    backup: BackupConfig = BackupConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init arguments; the environment overrides it.
        return env_settings, init_settings

    @field_validator("instance_id")
    @classmethod
    def _check_instance_id(cls, value: str) -> str:
        if not value:
            raise ValueError("not set, and $HOSTNAME is empty: set instance_id")
        if "\x00" in value:
            raise ValueError("contains a NUL character")
        if any(c in value for c in "/+#") or value.startswith("$"):
            raise ValueError("must not contain '/', '+', '#' or start with '$'")
        if len(value.encode()) > 100:
            raise ValueError("longer than 100 bytes (client ids are derived from it)")
        return value

    @model_validator(mode="after")
    def _no_loop_on_one_broker(self) -> BridgeConfig:
        if set(self.source.addresses) & set(self.target.addresses):
            problems = loop_problems(self, self, "")
            topics = self.heartbeat_topics()
            if topics is not None and topics[0] == topics[1]:
                problems.append(
                    f"heartbeat.target_topic: {topics[1]!r} is heartbeat.topic on the same "
                    "broker: the reader would see heartbeats that never crossed the bridge"
                )
            if problems:
                raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _copy_routes_own_their_group(self) -> BridgeConfig:
        # A takeover route's share group is the legacy consumers' group; a copy route in
        # it would take their messages instead of copying them.
        legacy = {r.share_group for r in self.routes if r.mode == "takeover" and r.share_group}
        for i, route in enumerate(self.routes):
            if route.mode == "copy" and route.share_group in legacy:
                raise ValueError(
                    f"routes[{i}].share_group: {route.share_group!r} is the group of a takeover "
                    "route (the legacy consumers'); a copy route needs a plain subscription or "
                    "a share group only bridge workers join"
                )
        # A message does not say which subscription brought it: the first matching route
        # gets it. A takeover message gated by a copy route's cohort would reach no one.
        for i, route in enumerate(self.routes):
            if route.mode != "copy":
                continue
            mine = filter_pattern(TopicFilter.parse(route.source))
            for j, other in enumerate(self.routes):
                theirs = filter_pattern(TopicFilter.parse(other.source))
                if other.mode == "takeover" and patterns_overlap(mine, theirs):
                    raise ValueError(
                        f"routes[{i}].source: {route.source!r} overlaps the takeover route "
                        f"routes[{j}] ({other.source!r}): a worker cannot tell which "
                        "subscription a message came through; run the copy route in workers "
                        "of its own"
                    )
        return self

    @model_validator(mode="after")
    def _heartbeat_fits(self) -> BridgeConfig:
        topics = self.heartbeat_topics()
        if topics is None:
            return self
        # Every worker's heartbeat topic, whatever its instance_id: a route that can take
        # them would carry other workers' heartbeats as traffic.
        pattern = tuple(
            ONE if "\x00" in level else level
            for level in self._heartbeat_topic(self.heartbeat.topic, "\x00").split("/")
        )
        for i, route in enumerate(self.routes):
            if patterns_overlap(filter_pattern(TopicFilter.parse(route.source)), pattern):
                raise ValueError(
                    f"routes[{i}].source: {route.source!r} also matches the heartbeat topic "
                    f"{topics[0]!r}: move heartbeat.topic out of the routes' way "
                    "(or set heartbeat.enabled: false)"
                )
        for key, broker, topic in (
            ("topic", self.source, topics[0]),
            ("target_topic", self.target, topics[1]),
        ):
            problem = broker.limits.topic_limits().violation(topic.encode(), 0)
            if problem is not None:
                raise ValueError(f"heartbeat.{key}: {problem}")
        return self

    @model_validator(mode="after")
    def _connections_share(self) -> BridgeConfig:
        if self.source.connections > 1 and not any(r.share_group for r in self.routes):
            raise ValueError(
                f"source.connections: {self.source.connections} connections need a route with "
                "a share_group (a plain subscription on each would take every message N times)"
            )
        return self

    @model_validator(mode="after")
    def _flow_grows_with_the_pool(self) -> BridgeConfig:
        # Unless set, flow.max_inflight holds every target window (twice in `required`
        # mode, where batches wait for S3 too): a smaller bound idles the pool.
        window = self.target.limits.inflight
        if "max_inflight" in self.flow.model_fields_set or window is None:
            return self
        s3 = self.backup.s3
        need = self.target.connections * window * (2 if s3 and s3.mode == "required" else 1)
        wanted = min(65535, max(self.flow.max_inflight, need))
        if wanted != self.flow.max_inflight:
            object.__setattr__(self, "flow", self.flow.model_copy(update={"max_inflight": wanted}))
        return self

    @model_validator(mode="after")
    def _client_ids_fit(self) -> BridgeConfig:
        for side, ids in (
            ("source", [self.source_client_id(i) for i in range(self.source_connections)]),
            ("target", [self.target_client_id(i) for i in range(self.target.connections)]),
            (
                "source",
                [self.side_client_id("source", "hb"), self.side_client_id("source", "probe")],
            ),
            (
                "target",
                [self.side_client_id("target", "hb"), self.side_client_id("target", "probe")],
            ),
        ):
            broker: BrokerConfig = getattr(self, side)
            longest = max(len(client_id.encode()) for client_id in ids)
            if longest > MQTT_STRING_MAX:
                # The ids get "-<n>" suffixes: a client_id that fits may still not.
                raise ValueError(
                    f"{side}: the client ids derived from client_id are up to {longest} "
                    f"bytes: MQTT allows at most {MQTT_STRING_MAX}"
                )
            if broker.profile != "aws-iot":
                continue
            for client_id in ids:
                if len(client_id.encode()) > AWS_CLIENT_ID_MAX or client_id.startswith("$"):
                    raise ValueError(
                        f"{side}: client id {client_id!r} breaks AWS IoT Core's rule "
                        f"(at most {AWS_CLIENT_ID_MAX} bytes, no leading '$')"
                    )
        return self

    # Client ids and the source connection plan are derived here, and only here: the
    # checks above and the wiring that opens the connections must agree.

    def source_plan(self) -> list[list[tuple[str, int]]]:
        """The subscriptions of each source connection.

        One connection, unless the broker caps subscriptions per connection; then
        ``source.connections - 1`` more sets that subscribe the share groups again. Plain
        subscriptions (and the heartbeat's) stay on the first set: on two connections they
        would take every message twice.
        """
        cap = self.source.limits.subscriptions_per_connection
        subscriptions: list[tuple[str, int]] = [(r.subscription, r.qos) for r in self.routes]
        topics = self.heartbeat_topics()
        if topics is not None:
            # QoS 0: a stopped worker's session does not collect heartbeats.
            subscriptions.append((topics[0], 0))
        plan = plan_subscriptions(subscriptions, cap)
        shared: list[tuple[str, int]] = [
            (r.subscription, r.qos) for r in self.routes if r.share_group
        ]
        for _ in range(1, self.source.connections):
            plan += plan_subscriptions(shared, cap)
        return plan

    @property
    def source_connections(self) -> int:
        return len(self.source_plan())

    def source_client_id(self, index: int = 0) -> str:
        base = self.source.client_id_base(f"{self.instance_id}-src")
        return base if index == 0 else f"{base}-{index}"

    def side_client_id(self, side: Literal["source", "target"], role: str) -> str:
        """The heartbeat's (``hb``) and the failback probe's (``probe``) client id on a side."""
        if side == "source":
            return f"{self.source.client_id_base(f'{self.instance_id}-src')}-{role}"
        return f"{self.target.client_id_base(f'{self.instance_id}-tgt')}-{role}"

    def _heartbeat_topic(self, template: str, instance_id: str | None = None) -> str:
        return template.replace("{direction}", self.direction).replace(
            "{instance_id}", self.instance_id if instance_id is None else instance_id
        )

    def heartbeat_topics(self) -> tuple[str, str] | None:
        """(topic on the source, topic on the target) of this worker's heartbeat, if on."""
        hb = self.heartbeat
        if not hb.enabled:
            return None
        topic = self._heartbeat_topic(hb.topic)
        if hb.target_topic:
            return topic, self._heartbeat_topic(hb.target_topic)
        if set(self.source.addresses) & set(self.target.addresses):
            # One broker on both sides: the reader must not see the original publish.
            return topic, f"{topic}/crossed"
        return topic, topic

    def target_client_id(self, index: int, tag: str = "tgt") -> str:
        """``tag`` keeps other tools' connections (replay) apart from the worker's."""
        if self.target.client_id and tag == "tgt":
            return f"{self.target.client_id}-{index}"
        return f"{self.instance_id}-{tag}-{index}"

    def broker(self, side: Literal["source", "target"]) -> BrokerConfig:
        """The ``source`` or ``target`` section."""
        return self.source if side == "source" else self.target

    def packet_limit(self, side: Literal["source", "target"]) -> int:
        """The Maximum Packet Size a side's broker may send us (see limits.packet_limit)."""
        broker = self.broker(side)
        if broker.max_packet_size is not None:
            return broker.max_packet_size
        if side == "target":
            return TARGET_PACKET_LIMIT
        return source_packet_limit(self.target.limits.max_payload, self.flow.max_inflight_bytes)

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as `check` prints and the start log records it."""
        dumped = self.model_dump(mode="json")
        # Credentials are refused in every URL; masking them again costs nothing.
        for side in ("source", "target"):
            dumped[side]["url"] = redact_url(dumped[side]["url"])
        s3 = (dumped.get("backup") or {}).get("s3")
        if s3 and s3.get("endpoint_url"):
            s3["endpoint_url"] = redact_url(s3["endpoint_url"])
        return dumped

    def effective(self) -> dict[str, Any]:
        """``redacted()`` with what the worker derives filled in: the client id bases and
        route names (profile presets are already applied to ``limits``). Loading it again
        gives the same worker."""
        shown = self.redacted()
        shown["source"]["client_id"] = self.source_client_id(0)
        shown["target"]["client_id"] = self.target.client_id or f"{self.instance_id}-tgt"
        for route, given in zip(shown["routes"], self.routes, strict=True):
            route["name"] = given.label
        return shown

    def client_ids(self) -> dict[str, list[str]]:
        """The MQTT client id of every connection, per side."""
        return {
            "source": [self.source_client_id(i) for i in range(self.source_connections)],
            "target": [self.target_client_id(i) for i in range(self.target.connections)],
        }


def loop_problems(a: BridgeConfig, b: BridgeConfig, b_name: str) -> list[str]:
    """Routes of ``a`` whose target topics can match a source filter of ``b``."""
    problems = []
    produced: list[tuple[str, str, tuple[str, ...]]] = []
    for i, route in enumerate(a.routes):
        src = TopicFilter.parse(route.source)
        pattern = template_pattern(TopicTemplate.parse(route.target, src), src)
        produced.append((f"routes[{i}].target", route.target, pattern))
    topics = a.heartbeat_topics()
    if topics is not None:
        produced.append(("heartbeat.target_topic", topics[1], tuple(topics[1].split("/"))))
    for where_a, text, pattern in produced:
        for j, other in enumerate(b.routes):
            if patterns_overlap(pattern, filter_pattern(TopicFilter.parse(other.source))):
                where = f"{b_name} " if b_name else ""
                problems.append(
                    f"{where_a}: {text!r} can match {where}routes[{j}].source "
                    f"{other.source!r} on the same broker: messages would loop"
                )
    return problems


def _loc(parts: tuple[int | str, ...]) -> str:
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
            continue
        shown = part
        if not part.isprintable() or " " in part or len(part) > 60:
            # A key from the file or the environment: keep the line one line, and short.
            shown = repr(part[:60]) + ("…" if len(part) > 60 else "")
        text += f".{shown}"
    return text.lstrip(".")


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown key"
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if kind.startswith("literal_"):
        message = message.replace("Input should be", "must be")
    return message


def format_validation_error(
    exc: ValidationError, environ: Mapping[str, str] | None = None
) -> list[str]:
    """One line per problem. A value a ``BRIDGE_…`` variable set is reported under that
    variable's name (``environ``), since the file is not where to fix it."""
    lines = []
    for e in exc.errors(include_url=False):
        loc = tuple(e["loc"])
        text = f"{_loc(loc)}: {_message(e)}" if loc else _message(e)
        variable = variable_for(loc, environ) if environ is not None and loc else None
        if variable is not None:
            text = f"{ENV_ORIGIN}{variable}: {text}"
        elif environ is not None and loc:
            inside = variables_inside(loc, environ)
            if inside:
                text += f" (with {', '.join(inside)} from the environment)"
        lines.append(text)
    return lines


def load_config(path: str | Path) -> BridgeConfig:
    """Read, validate and freeze one configuration file; raise ConfigError on any problem.

    ``loader`` reads the file (duplicate keys and syntax errors in plain words) and checks
    that every ``BRIDGE_…`` variable names a setting; the model validates the values.
    """
    raw = read_yaml(Path(path))
    odd = [key for key in raw if not isinstance(key, str)]
    if odd:
        raise ConfigError([f"{path}: key {key!r} is not a name" for key in odd])
    problems = unknown_variables(os.environ, BridgeConfig)
    if problems:
        raise ConfigError(problems)
    try:
        return BridgeConfig(**raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, os.environ)) from None
    except SettingsError:
        raise ConfigError(_environment_problems()) from None


def located(path: str, problems: list[str]) -> list[str]:
    """Problems as ``check`` prints them: each starts with the file it is about."""
    return [p if p.startswith((path, ENV_ORIGIN)) else f"{path}: {p}" for p in problems]


def _environment_problems() -> list[str]:
    """The BRIDGE_ variables whose value must be JSON (a section or a list) and is not.

    pydantic-settings only says which top-level field failed; the variable is what the
    operator has to fix. The value itself is never shown: it may be a secret.
    """
    problems = []
    for name, value in sorted(os.environ.items()):
        if not name.upper().startswith("BRIDGE_") or not _wants_json(name):
            continue
        try:
            json.loads(value)
        except ValueError:
            problems.append(
                f"{ENV_ORIGIN}{name}: not valid JSON (a section or a list is given as JSON)"
            )
    return problems or ["a BRIDGE_ variable for a section or a list is not valid JSON"]


def _wants_json(name: str) -> bool:
    """Whether pydantic-settings parses ``name``'s value as JSON: it names a section
    (a model) or a list, following the ``__`` nesting."""
    model: Any = BridgeConfig
    annotation: Any = None
    for part in name[len("BRIDGE_") :].lower().split("__"):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return False
        annotation = fields[part].annotation
        model = next((a for a in (annotation, *get_args(annotation)) if isinstance(a, type)), None)
    kinds = (annotation, *get_args(annotation))
    return any(
        get_origin(a) in (list, dict) or (isinstance(a, type) and issubclass(a, BaseModel))
        for a in kinds
    )


def cross_check(configs: dict[str, BridgeConfig]) -> list[str]:
    """Loop checks between files: a DTB's targets against a BTD's sources and back."""
    problems = []
    names = list(configs)
    for a_name in names:
        for b_name in names:
            a, b = configs[a_name], configs[b_name]
            if a_name == b_name:
                continue
            same_broker = set(a.target.addresses) & set(b.source.addresses)
            if same_broker or a.direction != b.direction:
                problems += [f"{a_name}: {p}" for p in loop_problems(a, b, b_name)]
    return problems
