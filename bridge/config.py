"""Configuration: one settings root, nested sections, validated and frozen at start.

Sources, strongest first: ``BRIDGE_…`` environment variables (``__`` nests), then the
YAML file. Secrets are never inline: ``password_file`` names a file that is read here.
"""

from __future__ import annotations

import json
import os
import ssl
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
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
from bridge.routing import (
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
        parse_broker_url(value)
        return value

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
        return f"{self.host.lower()}:{self.port}"


class TargetConfig(BrokerConfig):
    connections: Annotated[int, Field(ge=1, le=1000)] = 1
    session_expiry: Annotated[int, Field(ge=0, le=0xFFFFFFFF)] = 0


class RouteConfig(Section):
    source: str
    share_group: str | None = None
    target: str = "{topic}"
    qos: Literal[0, 1] = 1
    retain: bool = True
    name: str | None = None

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

    @property
    def label(self) -> str:
        return self.name or self.source

    @property
    def subscription(self) -> str:
        if self.share_group:
            return f"$share/{self.share_group}/{self.source}"
        return self.source


class FlowConfig(Section):
    max_inflight: Annotated[int, Field(ge=1, le=65535)] = 1000
    max_inflight_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024 * 1024


class ShutdownConfig(Section):
    deadline: Annotated[float, Field(gt=0, le=3600)] = 20.0
    # After unsubscribing, the broker still flushes what it queued for our session;
    # the drain ends once nothing is in flight and nothing arrived for this long.
    quiet: Annotated[float, Field(gt=0, le=60)] = 0.5

    @model_validator(mode="after")
    def _quiet_fits(self) -> ShutdownConfig:
        if self.quiet >= self.deadline:
            raise ValueError(f"quiet ({self.quiet:g} s) must be shorter than deadline")
        return self


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
    source: BrokerConfig
    target: TargetConfig
    routes: Annotated[list[RouteConfig], Field(min_length=1)]
    flow: FlowConfig = FlowConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
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
        if self.source.address == self.target.address:
            problems = loop_problems(self, self, "")
            if problems:
                raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _client_ids_fit(self) -> BridgeConfig:
        for side, ids in (
            ("source", [self.source_client_id(i) for i in range(self.source_connections)]),
            ("target", [self.target_client_id(i) for i in range(self.target.connections)]),
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

    def packet_limit(self, side: Literal["source", "target"]) -> int:
        """The Maximum Packet Size a side's broker may send us (see limits.packet_limit)."""
        broker: BrokerConfig = getattr(self, side)
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


def format_validation_error(exc: ValidationError) -> list[str]:
    return [
        f"{_loc(tuple(e['loc']))}: {_message(e)}" if e["loc"] else _message(e)
        for e in exc.errors(include_url=False)
    ]


def load_config(path: str | Path) -> BridgeConfig:
    """Read, validate and freeze one configuration file; raise ConfigError on any problem."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        raw = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (at byte {exc.start})"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: {_yaml_problem(exc)}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: nested too deeply"]) from None
    except (ValueError, TypeError) as exc:
        # PyYAML's constructors raise these for values such as the date 2023-13-45.
        raise ConfigError([f"{path}: {exc} (quote the value if it is meant as text)"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of keys"])
    odd = [key for key in raw if not isinstance(key, str)]
    if odd:
        raise ConfigError([f"{path}: key {key!r} is not a name" for key in odd])
    try:
        return BridgeConfig(**raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    except SettingsError:
        raise ConfigError(_environment_problems()) from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.reader.ReaderError):
        return f"character #x{exc.character:04x} is not allowed in YAML (at {exc.position})"
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"line {mark.line + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or "invalid YAML"
    return f"{where}{problem}"


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
            problems.append(f"{name}: not valid JSON (a section or a list is given as JSON)")
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
            if a.target.address == b.source.address or a.direction != b.direction:
                problems += [f"{a_name}: {p}" for p in loop_problems(a, b, b_name)]
    return problems
