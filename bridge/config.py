"""Configuration: one settings root, nested sections, validated and frozen at start.

Sources, strongest first: ``BRIDGE_…`` environment variables (``__`` nests), then the
YAML file. Secrets are never inline: ``password_file`` names a file that is read here.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

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

from bridge.cohort import Cohort, CohortGate, read_device_list
from bridge.errors import ConfigError
from bridge.limits import AWS_CLIENT_ID_MAX, AWS_IOT_LIMITS, AWS_KEEPALIVE_RANGE, TopicLimits
from bridge.loader import ENV_ORIGIN, read_yaml, unknown_variables, variable_for, variables_inside
from bridge.routing import (
    TopicFilter,
    TopicTemplate,
    filter_pattern,
    patterns_overlap,
    plan_subscriptions,
    template_pattern,
)
from bridge.tls import client_context

HOP_MARKER = "mqtt-bridge-hop"
_FROZEN = ConfigDict(frozen=True, extra="forbid")


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


class TlsConfig(Section):
    ca_file: ReadableFile | None = None  # default: the system's CA bundle
    cert_file: ReadableFile | None = None
    key_file: ReadableFile | None = None
    alpn: list[str] = []  # e.g. ["x-amzn-mqtt-ca"] for X.509 on port 443
    server_name: str | None = None  # SNI and the name verified; default the URL's host
    _context: ssl.SSLContext | None = PrivateAttr(default=None)

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

    publish_rate: Annotated[float, Field(gt=0)] | None = None
    bytes_rate: Annotated[float, Field(gt=0)] | None = None
    burst: Annotated[float, Field(gt=0, le=1)] = 1.0
    inflight: Annotated[int, Field(ge=1, le=65535)] | None = None
    max_payload: Annotated[int, Field(ge=1)] | None = None
    max_topic_bytes: Annotated[int, Field(ge=1)] | None = None
    max_topic_slashes: Annotated[int, Field(ge=0)] | None = None
    subscriptions_per_connection: Annotated[int, Field(ge=1)] | None = None
    filters_per_subscribe: Annotated[int, Field(ge=1)] | None = None
    connect_interval: Annotated[float, Field(ge=0)] = 0.0
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
    connect_timeout: Annotated[float, Field(gt=0)] = 10.0
    tls: TlsConfig | None = None
    limits: LimitsConfig = LimitsConfig()

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
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"scheme must be mqtt:// or mqtts://, got {value!r}")
        if not parts.hostname:
            raise ValueError(f"no host in {value!r}")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ValueError(f"bad port in {value!r}") from None
        if parts.password:
            raise ValueError("no password in the URL: use password_file")
        if parts.path not in ("", "/"):
            raise ValueError(f"unexpected path {parts.path!r} in the URL")
        return value

    @model_validator(mode="after")
    def _check(self) -> BrokerConfig:
        if self.password_file is not None:
            self._password = SecretStr(self.password_file.read_text().rstrip("\r\n"))
        if self.password_file is not None and self.username is None and self.protocol == "3.1.1":
            raise ValueError("password_file needs username with MQTT 3.1.1 (MQTT-3.1.2-22)")
        if self.tls is not None and not self.is_tls:
            # Never a silent plaintext connection when TLS settings were given.
            raise ValueError("tls is set but the url is mqtt://: use mqtts://")
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
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def is_tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def address(self) -> str:
        return f"{self.host.lower()}:{self.port}"


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
        if value is not None and (not value or any(c in value for c in "/+#")):
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


class FlowConfig(Section):
    max_inflight: Annotated[int, Field(ge=1, le=65535)] = 1000
    max_inflight_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024 * 1024
    # A QoS 0 message that finds the flow full (flow.WhenFull): `block` stops reading, so
    # TCP and the source broker's queue absorb the burst (as Mosquitto's bridge does);
    # `drop` drops it and counts it (dropped{reason="full"}), for freshness over delivery.
    qos0_when_full: Literal["block", "drop"] = "block"


class ShutdownConfig(Section):
    deadline: Annotated[float, Field(gt=0)] = 20.0
    # After unsubscribing, the broker still flushes what it queued for our session;
    # the drain ends once nothing is in flight and nothing arrived for this long.
    quiet: Annotated[float, Field(gt=0)] = 0.5
    # What happens to each source session on a graceful leave (bridge/leave.py):
    # auto: shared subscriptions are given up and the session ended when drained; a
    # session with a plain subscription is kept for the next start. keep | end: always.
    session: Literal["auto", "keep", "end"] = "auto"


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


class HttpConfig(Section):
    listen: str | None = "127.0.0.1:9100"

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        _host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"expected HOST:PORT, got {value!r}")
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
    flush_interval: Annotated[float, Field(gt=0)] = 1.0
    max_batch_bytes: Annotated[int, Field(ge=1024)] = 8 * 1024 * 1024
    max_buffer_bytes: Annotated[int, Field(ge=1024)] = 256 * 1024 * 1024
    # Objects written at once. `required` mode also seals a batch once it holds
    # flow.max_inflight / (max_uploads + 1) messages (README "Sizing `required`").
    max_uploads: Annotated[int, Field(ge=1, le=64)] = 4

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
    stats_interval: Annotated[float, Field(gt=0)] = 10.0


class BridgeConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BRIDGE_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
    )

    instance_id: str = Field(default_factory=lambda: os.environ.get("HOSTNAME", ""))
    direction: Literal["dtb", "btd"]
    source: BrokerConfig
    target: TargetConfig
    routes: Annotated[list[RouteConfig], Field(min_length=1)]
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
        if any(c in value for c in "/+#") or value.startswith("$"):
            raise ValueError("must not contain '/', '+', '#' or start with '$'")
        if len(value.encode()) > 100:
            raise ValueError("longer than 100 bytes (client ids are derived from it)")
        return value

    @model_validator(mode="after")
    def _no_loop_on_one_broker(self) -> BridgeConfig:
        if self.source.address == self.target.address:
            problems = loop_problems(self, self, "")
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
        ):
            broker: BrokerConfig = getattr(self, side)
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
        """The subscriptions of each source connection (one unless the broker caps them)."""
        return plan_subscriptions(
            [(r.subscription, r.qos) for r in self.routes],
            self.source.limits.subscriptions_per_connection,
        )

    @property
    def source_connections(self) -> int:
        return len(self.source_plan())

    def source_client_id(self, index: int = 0) -> str:
        base = self.source.client_id or f"{self.instance_id}-src"
        return base if index == 0 else f"{base}-{index}"

    def target_client_id(self, index: int, tag: str = "tgt") -> str:
        """``tag`` keeps other tools' connections (replay) apart from the worker's."""
        if self.target.client_id and tag == "tgt":
            return f"{self.target.client_id}-{index}"
        return f"{self.instance_id}-{tag}-{index}"

    def redacted(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

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
    for i, route in enumerate(a.routes):
        src = TopicFilter.parse(route.source)
        produced = template_pattern(TopicTemplate.parse(route.target, src), src)
        for j, other in enumerate(b.routes):
            if patterns_overlap(produced, filter_pattern(TopicFilter.parse(other.source))):
                where = f"{b_name} " if b_name else ""
                problems.append(
                    f"routes[{i}].target: {route.target!r} can match {where}routes[{j}].source "
                    f"{other.source!r} on the same broker: messages would loop"
                )
    return problems


def _loc(parts: tuple[int | str, ...]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
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
    problems = unknown_variables(os.environ, BridgeConfig)
    if problems:
        raise ConfigError(problems)
    try:
        return BridgeConfig(**raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, os.environ)) from None


def located(path: str, problems: list[str]) -> list[str]:
    """Problems as ``check`` prints them: each starts with the file it is about."""
    return [p if p.startswith((path, ENV_ORIGIN)) else f"{path}: {p}" for p in problems]


def cross_check(configs: dict[str, BridgeConfig]) -> list[str]:
    """Loop checks between files: a DTB's targets against a BTD's sources and back."""
    problems = []
    names = list(configs)
    for a_name in names:
        for b_name in names:
            a, b = configs[a_name], configs[b_name]
            if a_name == b_name:
                continue
            if a.target.address == b.source.address or a.direction != b.direction:
                problems += [f"{a_name}: {p}" for p in loop_problems(a, b, b_name)]
    return problems
