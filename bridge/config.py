"""Configuration: one settings root, nested sections, validated and frozen at start.

Sources, strongest first: ``BRIDGE_…`` environment variables (``__`` nests), then the
YAML file. Secrets are never inline: ``password_file`` names a file that is read here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
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

from bridge.errors import ConfigError
from bridge.routing import (
    TopicFilter,
    TopicTemplate,
    filter_pattern,
    patterns_overlap,
    template_pattern,
)

HOP_MARKER = "mqtt-bridge-hop"
_FROZEN = ConfigDict(frozen=True, extra="forbid")


class Section(BaseModel):
    model_config = _FROZEN


class BrokerConfig(Section):
    url: str
    protocol: Literal["5", "3.1.1"] = "5"
    session_expiry: Annotated[int, Field(ge=0, le=0xFFFFFFFF)] = 300
    keepalive: Annotated[int, Field(ge=0, le=65535)] = 60
    client_id: str | None = None
    username: str | None = None
    password_file: Path | None = None
    _password: SecretStr | None = PrivateAttr(default=None)
    connect_timeout: Annotated[float, Field(gt=0)] = 10.0

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
    def _read_password(self) -> BrokerConfig:
        if self.password_file is not None:
            try:
                secret = self.password_file.read_text().rstrip("\r\n")
            except OSError as exc:
                raise ValueError(
                    f"password_file: cannot read {self.password_file}: {exc.strerror}"
                ) from None
            self._password = SecretStr(secret)
        return self

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
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"

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
    deadline: Annotated[float, Field(gt=0)] = 20.0
    # After unsubscribing, the broker still flushes what it queued for our session;
    # the drain ends once nothing is in flight and nothing arrived for this long.
    quiet: Annotated[float, Field(gt=0)] = 0.5


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
    http: HttpConfig = HttpConfig()
    log: LogConfig = LogConfig()

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

    def source_client_id(self) -> str:
        return self.source.client_id or f"{self.instance_id}-src"

    def target_client_id(self, index: int) -> str:
        base = self.target.client_id or f"{self.instance_id}-tgt"
        return f"{base}-{index}"

    def redacted(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


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


def format_validation_error(exc: ValidationError) -> list[str]:
    return [
        f"{_loc(tuple(e['loc']))}: {_message(e)}" if e["loc"] else _message(e)
        for e in exc.errors(include_url=False)
    ]


def load_config(path: str | Path) -> BridgeConfig:
    """Read, validate and freeze one configuration file; raise ConfigError on any problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError([f"{path}:{where}: {problem}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of keys"])
    try:
        return BridgeConfig(**raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


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
