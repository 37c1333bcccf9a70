"""gateway.yaml → frozen, typed configuration, read once at start-up.

Every mistake stops start-up with `file: key.path: problem` (see yamlnode.ConfigError).
Values may reference the environment as `${VAR}` or `${VAR:-default}`.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.yamlnode import ConfigError, Node, load_yaml_file

__all__ = ["ConfigError", "GatewayConfig", "load_config"]

# Ids become part of Redis keys and ledger rows: keep them to a safe alphabet.
IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
PROVIDER_TYPES = {"openai", "azure", "anthropic", "mock"}
# Where an OpenAI-family provider reads a translated request's completion cap.
MAX_TOKENS_FIELDS = {"max_completion_tokens", "max_tokens"}


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 8 * 1024 * 1024
    log_level: str = "info"
    # One JSON object per log line (else plain text).
    log_json: bool = True
    # Include each request's prompt in its log line (off: prompts are never logged).
    log_prompts: bool = False
    # Worker processes sharing the port (SO_REUSEPORT); metrics are added up across them.
    workers: int = 1
    # How long a request body may take to arrive (slow clients hold connections).
    body_timeout_seconds: float = 30.0
    # Failed key checks per client address per minute before it is refused (0: no limit).
    auth_failures_per_minute: int = 20
    # Terminate TLS here (else plain HTTP, e.g. behind a proxy that terminates it).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # A non-streamed request whose client leaves: "finish" reads the provider's answer
    # anyway and settles with its usage; "abort" closes the call (prompt charged only).
    on_client_disconnect: str = "finish"
    # How long a request's line and headers may take to arrive (a connection that
    # trickles them is closed), and how large they may be in all.
    header_timeout_seconds: float = 10.0
    max_header_bytes: int = 32 * 1024
    # Open connections from one client address (0: no limit).
    max_connections_per_address: int = 256
    # Peers (addresses or CIDR networks) whose X-Forwarded-For / Forwarded headers name
    # the client address; from any other peer those headers are ignored.
    trusted_proxies: tuple[Network, ...] = ()


@dataclass(frozen=True)
class RedisConfig:
    url: str
    key_prefix: str = "gw:"
    max_connections: int = 64
    pool_timeout_seconds: float = 5.0
    # A Redis Cluster: `url` names any one node; the others are discovered.
    cluster: bool = False


@dataclass(frozen=True)
class PostgresConfig:
    dsn: str
    min_connections: int = 1
    max_connections: int = 10


@dataclass(frozen=True)
class SqliteConfig:
    path: Path


@dataclass(frozen=True)
class BackendsConfig:
    """Where quota state and the ledger live; None means the embedded default."""

    redis: RedisConfig | None
    postgres: PostgresConfig | None
    sqlite: SqliteConfig


@dataclass(frozen=True)
class TimeoutsConfig:
    connect_seconds: float = 10.0
    # Until the provider's response headers arrive.
    first_byte_seconds: float = 120.0
    # Between two reads of a response (a stalled stream ends after this).
    idle_seconds: float = 300.0
    # A whole non-streamed request.
    total_seconds: float = 600.0


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    type: str
    base_url: str | None = None
    api_key_env: str | None = None
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    # Azure OpenAI's api-version query parameter.
    api_version: str | None = None
    # The mock provider's pace: seconds to the first token, then tokens per second (0: at once).
    latency_seconds: float = 0.0
    tokens_per_second: float = 0.0
    # Open connections to the provider per worker; past it a request waits (0: no cap).
    max_connections: int = 0
    # The egress proxy: None takes HTTPS_PROXY / HTTP_PROXY / NO_PROXY from the
    # environment; "direct" goes straight to the provider whatever the environment says.
    proxy: str | None = None
    # A private CA to trust instead of the system's, and a client certificate (mTLS).
    ca_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None
    # Addresses to connect to instead of resolving base_url's host (split-horizon DNS,
    # a pinned endpoint); TLS still checks the certificate against the host's name.
    addresses: tuple[str, ...] = ()
    # A response body larger than this (after decompression) is cut off with a 502.
    max_response_bytes: int = 64 * 1024 * 1024
    # Whether callers see the provider's own error message; off, since it can hold
    # internal addresses or a fragment of our credentials. The log always has it, redacted.
    expose_errors: bool = False
    # OpenAI-family providers: the field a translated Messages request's max_tokens goes
    # in (docs/translation.md). max_completion_tokens is OpenAI's current name and the only
    # one its reasoning models take; a compatible server that reads only max_tokens needs that.
    max_tokens_field: str = "max_completion_tokens"


@dataclass(frozen=True)
class PriceConfig:
    """USD per million tokens."""

    input: float
    output: float
    cached_input: float | None = None
    # Prompt tokens written to the provider's cache (Anthropic bills them above input).
    cache_write_input: float | None = None

    def cost_usd(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        cached_prompt_tokens: int = 0,
        cache_write_prompt_tokens: int = 0,
    ) -> float:
        cached_price = self.input if self.cached_input is None else self.cached_input
        write_price = self.input if self.cache_write_input is None else self.cache_write_input
        plain = prompt_tokens - cached_prompt_tokens - cache_write_prompt_tokens
        micro = (
            plain * self.input
            + cached_prompt_tokens * cached_price
            + cache_write_prompt_tokens * write_price
            + completion_tokens * self.output
        )
        return micro / 1_000_000

    def cost_micro_usd(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        cached_prompt_tokens: int = 0,
        cache_write_prompt_tokens: int = 0,
    ) -> int:
        """Whole millionths of a dollar, rounded up: what quota counters count."""
        cost = self.cost_usd(
            prompt_tokens, completion_tokens, cached_prompt_tokens, cache_write_prompt_tokens
        )
        return math.ceil(cost * 1_000_000 - 1e-9)


@dataclass(frozen=True)
class DeploymentConfig:
    """One place a model is served: a provider, the model's name there, a routing weight."""

    provider: str
    upstream_model: str
    weight: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    name: str
    # The first deployment's provider and model name: labels, counting, the ledger.
    provider: str
    upstream_model: str
    tokenizer: str | None = None
    price: PriceConfig | None = None
    deployments: tuple[DeploymentConfig, ...] = ()


@dataclass(frozen=True)
class StaticKeyConfig:
    id: str
    sha256: str
    user: str
    team: str | None
    tags: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    expires_at: datetime | None = None


@dataclass(frozen=True)
class QuotaConfig:
    policy_glob: str = "policies/*.yaml"
    default_max_completion_tokens: int = 4096
    # Calendar windows (day, month) begin at midnight in this zone.
    time_zone: str = "UTC"
    # A reservation never settled (its gateway died) is refunded after this long.
    reservation_ttl_seconds: float = 600.0
    # After Redis fails, requests skip it for this long before trying again.
    redis_retry_seconds: float = 1.0


@dataclass(frozen=True)
class LedgerConfig:
    batch_size: int = 500
    flush_interval_seconds: float = 0.1
    # Where usage records wait on disk for the database (relative to gateway.yaml).
    spool_dir: Path = Path("var/spool")
    segment_bytes: int = 16 << 20


@dataclass(frozen=True)
class BpeFileConfig:
    """A BPE file in tiktoken's format (rank per base64 token), e.g. Llama 3's tokenizer.model."""

    name: str
    path: Path | None
    # "package/relative/path" inside an installed Python package, when path is None.
    package_resource: str | None
    pattern: str
    special_tokens: tuple[str, ...]
    # Pads the special tokens with <|reserved_special_token_N|> up to this many.
    reserved_special_tokens: int = 0
    # The file's expected SHA-256: another file is never counted as exact.
    sha256: str | None = None


@dataclass(frozen=True)
class TokenRuleConfig:
    """Model name patterns → how their prompts are counted."""

    models: tuple[str, ...]
    tokenizer: str
    chat_format: str = "openai"
    exact: bool = False
    factor: float = 1.0


@dataclass(frozen=True)
class TokensConfig:
    fallback: str = "o200k_base"
    rules: tuple[TokenRuleConfig, ...] = ()
    bpe_files: tuple[BpeFileConfig, ...] = ()
    learn_calibration: bool = True
    apply_calibration: bool = False
    calibration_min_samples: int = 20
    # Bodies above this many bytes are counted in a worker thread.
    thread_threshold_bytes: int = 64 * 1024
    cache_entries: int = 20_000
    remote_image_width: int = 1024
    remote_image_height: int = 1024
    # Where the tiktoken encoding files are read from (never downloaded at run time;
    # `gateway tokenizers fetch` fills it). None: default_tokenizer_cache(Path.cwd()).
    cache_dir: Path | None = None


TOKENIZER_CACHE_ENV = "TIKTOKEN_CACHE_DIR"
DEFAULT_TOKENIZER_CACHE = Path("var/tokenizers")


def default_tokenizer_cache(base_dir: Path) -> Path:
    """tokens.cache_dir when gateway.yaml has none: $TIKTOKEN_CACHE_DIR, which tiktoken
    itself reads (so an existing cache keeps working), else var/tokenizers beside it."""
    from_env = os.environ.get(TOKENIZER_CACHE_ENV)
    return Path(from_env) if from_env else base_dir / DEFAULT_TOKENIZER_CACHE


@dataclass(frozen=True)
class RoutingConfig:
    """Retries before the first byte reaches the client, and the circuit breaker."""

    attempts_per_deployment: int = 2
    backoff_seconds: float = 0.2
    breaker_failures: int = 3
    breaker_cooldown_seconds: float = 30.0


@dataclass(frozen=True)
class ConsoleConfig:
    """The operators' web console at /ui/ (served only while the admin API is on)."""

    enabled: bool = True
    # A session ends after this long without a page view, and this long after its
    # login whatever happens.
    idle_timeout_seconds: float = 1800.0
    session_lifetime_seconds: float = 43200.0
    # Cookies are marked Secure when the connection is TLS ("auto"), or always (behind
    # a proxy that terminates TLS and forwards plain HTTP).
    secure_cookies: str = "auto"


@dataclass(frozen=True)
class GatewayConfig:
    path: Path
    server: ServerConfig
    backends: BackendsConfig
    providers: dict[str, ProviderConfig]
    models: dict[str, ModelConfig]
    keys: tuple[StaticKeyConfig, ...]
    quota: QuotaConfig
    ledger: LedgerConfig
    tokens: TokensConfig = field(default_factory=TokensConfig)
    # SHA-256 of the admin API's key; None turns the admin API off.
    admin_key_sha256: str | None = None
    # (host, port) to serve the admin API on its own, away from the public port.
    admin_address: tuple[str, int] | None = None
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    # Per-team metric series (off: no team ever appears in a label).
    metrics_team_labels: bool = False
    console: ConsoleConfig = field(default_factory=ConsoleConfig)

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate gateway.yaml; raises ConfigError naming file and key path."""
    config_path = Path(path).resolve()
    root = load_yaml_file(config_path)
    root.mapping(
        {
            "server",
            "backends",
            "providers",
            "models",
            "keys",
            "quota",
            "ledger",
            "tokens",
            "admin",
            "routing",
            "metrics",
            "console",
        }
    )
    base_dir = config_path.parent
    providers = _providers(root.require("providers"))
    return GatewayConfig(
        path=config_path,
        server=_server(root.get("server"), config_path.parent),
        backends=_backends(root.get("backends"), base_dir),
        providers=providers,
        models=_models(root.require("models"), providers),
        keys=_static_keys(root.get("keys")),
        quota=_quota(root.get("quota")),
        ledger=_ledger(root.get("ledger"), base_dir),
        tokens=_tokens(root.get("tokens"), base_dir),
        admin_key_sha256=_admin(root.get("admin")),
        admin_address=_admin_address(root.get("admin")),
        routing=_routing(root.get("routing")),
        metrics_team_labels=_metrics(root.get("metrics")),
        console=_console(root.get("console")),
    )


def _server(node: Node | None, base_dir: Path) -> ServerConfig:
    if node is None:
        return ServerConfig()
    keys = (
        "host",
        "port",
        "max_body_bytes",
        "log_level",
        "log_json",
        "log_prompts",
        "workers",
        "auth_failures_per_minute",
        "tls",
        "body_timeout_seconds",
        "on_client_disconnect",
    )
    guards = ("header_timeout_seconds", "max_header_bytes", "max_connections_per_address", "trusted_proxies")
    node.mapping(set(keys) | set(guards))
    default = ServerConfig()
    host, port, body, level, log_json, log_prompts, workers, failures, tls, body_timeout, on_disconnect = (
        node.get(k) for k in keys
    )
    header_timeout, header_bytes, per_address, proxies = (node.get(k) for k in guards)
    cert = key = None
    if tls is not None:
        tls.mapping({"cert_file", "key_file"})
        cert = base_dir / tls.require("cert_file").as_str()
        key = base_dir / tls.require("key_file").as_str()
        for name, path in (("cert_file", cert), ("key_file", key)):
            if not path.is_file():
                tls.child(name, None).fail(f"no such file: {path}")
    return ServerConfig(
        host=host.as_str() if host else default.host,
        port=port.as_int(minimum=0) if port else default.port,
        max_body_bytes=body.as_int(minimum=1024) if body else default.max_body_bytes,
        log_level=level.as_choice({"debug", "info", "warning", "error"}) if level else "info",
        log_json=log_json.as_bool() if log_json else default.log_json,
        log_prompts=log_prompts.as_bool() if log_prompts else default.log_prompts,
        workers=workers.as_int(minimum=1) if workers else default.workers,
        auth_failures_per_minute=failures.as_int(minimum=0) if failures else default.auth_failures_per_minute,
        body_timeout_seconds=body_timeout.as_float(minimum=0.01)
        if body_timeout
        else default.body_timeout_seconds,
        tls_cert_file=cert,
        tls_key_file=key,
        on_client_disconnect=on_disconnect.as_choice({"finish", "abort"})
        if on_disconnect
        else default.on_client_disconnect,
        header_timeout_seconds=header_timeout.as_float(minimum=0.01)
        if header_timeout
        else default.header_timeout_seconds,
        max_header_bytes=header_bytes.as_int(minimum=1024) if header_bytes else default.max_header_bytes,
        max_connections_per_address=per_address.as_int(minimum=0)
        if per_address
        else default.max_connections_per_address,
        trusted_proxies=_networks(proxies) if proxies else (),
    )


def _networks(node: Node) -> tuple[Network, ...]:
    """Addresses or CIDR networks (10.0.0.1 is 10.0.0.1/32), parsed here once for every user."""
    networks = []
    for item in node.elements():
        try:
            networks.append(ipaddress.ip_network(item.as_str(), strict=False))
        except ValueError:
            item.fail("must be an IP address or a CIDR network such as 10.0.0.0/8")
    return tuple(networks)


def _backends(node: Node | None, base_dir: Path) -> BackendsConfig:
    redis: RedisConfig | None = None
    postgres: PostgresConfig | None = None
    sqlite_path = base_dir / "var" / "gateway.db"
    if node is not None:
        node.mapping({"redis", "postgres", "sqlite"})
        if (redis_node := node.get("redis")) is not None:
            redis_node.mapping({"url", "key_prefix", "max_connections", "pool_timeout_seconds", "cluster"})
            cluster = redis_node.get("cluster")
            prefix, pool_size, pool_wait = (
                redis_node.get(key) for key in ("key_prefix", "max_connections", "pool_timeout_seconds")
            )
            redis = RedisConfig(
                url=_nonempty(redis_node.require("url")),
                key_prefix=prefix.as_str() if prefix else "gw:",
                max_connections=pool_size.as_int(minimum=1) if pool_size else 64,
                pool_timeout_seconds=pool_wait.as_float(minimum=0.001) if pool_wait else 5.0,
                cluster=cluster.as_bool() if cluster else False,
            )
        if (pg_node := node.get("postgres")) is not None:
            pg_node.mapping({"dsn", "min_connections", "max_connections"})
            low, high = pg_node.get("min_connections"), pg_node.get("max_connections")
            postgres = PostgresConfig(
                dsn=_nonempty(pg_node.require("dsn")),
                min_connections=low.as_int(minimum=0) if low else 1,
                max_connections=high.as_int(minimum=1) if high else 10,
            )
        if (sqlite_node := node.get("sqlite")) is not None:
            sqlite_node.mapping({"path"})
            sqlite_path = base_dir / sqlite_node.require("path").as_str()
    return BackendsConfig(redis=redis, postgres=postgres, sqlite=SqliteConfig(sqlite_path))


def _providers(node: Node) -> dict[str, ProviderConfig]:
    providers: dict[str, ProviderConfig] = {}
    for name, entry in node.items():
        if not IDENTIFIER.match(name):
            entry.fail("provider names may use letters, digits and . _ @ + -")
        entry.mapping(
            {
                "type",
                "base_url",
                "api_key_env",
                "timeouts",
                "api_version",
                "latency_seconds",
                "tokens_per_second",
                "max_connections",
                "proxy",
                "tls",
                "max_response_bytes",
                "expose_errors",
                "addresses",
                "max_tokens_field",
            }
        )
        kind = entry.require("type").as_choice(PROVIDER_TYPES)
        base_url = entry.get("base_url")
        if kind != "mock" and base_url is None:
            entry.child("base_url", None).fail(f"is required for providers of type {kind}")
        if base_url is not None and not base_url.as_str().startswith(("http://", "https://")):
            base_url.fail("must be an http:// or https:// URL")
        key_env, version = entry.get("api_key_env"), entry.get("api_version")
        if kind == "azure" and version is None:
            entry.child("api_version", None).fail("is required for providers of type azure (e.g. 2024-10-21)")
        latency, rate = entry.get("latency_seconds"), entry.get("tokens_per_second")
        connections = entry.get("max_connections")
        body_limit, expose = entry.get("max_response_bytes"), entry.get("expose_errors")
        ca_file, cert_file, key_file = _provider_tls(entry.get("tls"))
        max_tokens_field = entry.get("max_tokens_field")
        if max_tokens_field is not None and kind not in ("openai", "azure"):
            max_tokens_field.fail("applies only to providers of type openai or azure")
        providers[name] = ProviderConfig(
            name=name,
            type=kind,
            base_url=base_url.as_str().rstrip("/") if base_url else None,
            api_key_env=key_env.as_str() if key_env else None,
            timeouts=_timeouts(entry.get("timeouts")),
            api_version=version.as_str() if version else None,
            latency_seconds=latency.as_float(minimum=0) if latency else 0.0,
            tokens_per_second=rate.as_float(minimum=0) if rate else 0.0,
            max_connections=connections.as_int(minimum=0) if connections else 0,
            proxy=_proxy(entry.get("proxy")),
            addresses=_addresses(entry.get("addresses")),
            ca_file=ca_file,
            client_cert_file=cert_file,
            client_key_file=key_file,
            max_response_bytes=body_limit.as_int(minimum=1024)
            if body_limit
            else ProviderConfig.max_response_bytes,
            expose_errors=expose.as_bool() if expose else False,
            max_tokens_field=max_tokens_field.as_choice(MAX_TOKENS_FIELDS)
            if max_tokens_field
            else ProviderConfig.max_tokens_field,
        )
    if not providers:
        node.fail("at least one provider is required")
    return providers


def _addresses(node: Node | None) -> tuple[str, ...]:
    if node is None:
        return ()
    items = list(node.elements()) if isinstance(node.value, list) else [node]
    addresses = []
    for item in items:
        try:
            addresses.append(str(ipaddress.ip_address(item.as_str())))
        except ValueError:
            item.fail("must be an IPv4 or IPv6 address")
    if not addresses:
        node.fail("must list at least one address")
    return tuple(addresses)


def _proxy(node: Node | None) -> str | None:
    if node is None:
        return None
    proxy = node.as_str()
    if proxy != "direct" and not proxy.startswith(("http://", "https://")):
        node.fail('must be an http:// or https:// proxy URL, or "direct"')
    return proxy


def _provider_tls(node: Node | None) -> tuple[str | None, str | None, str | None]:
    """ca_file, client_cert_file, client_key_file: readable files, relative to gateway.yaml."""
    if node is None:
        return None, None, None
    keys = ("ca_file", "client_cert_file", "client_key_file")
    node.mapping(set(keys))
    paths: list[str | None] = []
    for key in keys:
        child = node.get(key)
        if child is None:
            paths.append(None)
            continue
        path = child.as_str()
        if not os.path.isabs(path) and os.path.isfile(node.file):
            # Relative to gateway.yaml, as operators keep certificates beside it.
            path = os.path.join(os.path.dirname(os.path.abspath(node.file)), path)
        if not os.access(path, os.R_OK):
            child.fail(f"{path} is not a readable file")
        paths.append(path)
    if paths[2] is not None and paths[1] is None:
        node.child("client_cert_file", None).fail("is required with client_key_file")
    return paths[0], paths[1], paths[2]


def _timeouts(node: Node | None) -> TimeoutsConfig:
    if node is None:
        return TimeoutsConfig()
    keys = ("connect_seconds", "first_byte_seconds", "idle_seconds", "total_seconds")
    node.mapping(set(keys))
    default = TimeoutsConfig()
    values = {
        key: (child.as_float(minimum=0.001) if (child := node.get(key)) else getattr(default, key))
        for key in keys
    }
    return TimeoutsConfig(**values)


def _models(node: Node, providers: dict[str, ProviderConfig]) -> dict[str, ModelConfig]:
    models: dict[str, ModelConfig] = {}
    for name, entry in node.items():
        entry.mapping({"provider", "upstream_model", "tokenizer", "price", "deployments"})
        deployments_node = entry.get("deployments")
        if deployments_node is not None:
            if entry.get("provider") is not None:
                entry.child("provider", None).fail("give either provider or deployments, not both")
            deployments = tuple(_deployment(item, name, providers) for item in deployments_node.elements())
            if not deployments:
                deployments_node.fail("needs at least one deployment")
        else:
            upstream = entry.get("upstream_model")
            deployments = (
                DeploymentConfig(
                    provider=_provider_name(entry.require("provider"), providers),
                    upstream_model=upstream.as_str() if upstream else name,
                ),
            )
        tokenizer = entry.get("tokenizer")
        models[name] = ModelConfig(
            name=name,
            provider=deployments[0].provider,
            upstream_model=deployments[0].upstream_model,
            tokenizer=tokenizer.as_str() if tokenizer else None,
            price=_price(entry.get("price")),
            deployments=deployments,
        )
    if not models:
        node.fail("at least one model is required")
    return models


def _deployment(node: Node, model: str, providers: dict[str, ProviderConfig]) -> DeploymentConfig:
    node.mapping({"provider", "upstream_model", "weight"})
    upstream, weight = node.get("upstream_model"), node.get("weight")
    return DeploymentConfig(
        provider=_provider_name(node.require("provider"), providers),
        upstream_model=upstream.as_str() if upstream else model,
        weight=weight.as_float(minimum=0.0) if weight else 1.0,
    )


def _moment(node: Node) -> datetime:
    value = node.value
    if isinstance(value, datetime):
        moment = value
    else:
        try:
            moment = datetime.fromisoformat(node.as_str().replace("Z", "+00:00"))
        except ValueError:
            node.fail("must be an ISO 8601 time, e.g. 2027-01-31T00:00:00Z")
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _provider_name(node: Node, providers: dict[str, ProviderConfig]) -> str:
    provider = node.as_str()
    if provider not in providers:
        node.fail(f"no provider named {provider!r} under providers")
    return provider


def _price(node: Node | None) -> PriceConfig | None:
    if node is None:
        return None
    node.mapping({"input", "output", "cached_input", "cache_write_input"})
    cached, cache_write = node.get("cached_input"), node.get("cache_write_input")
    return PriceConfig(
        input=node.require("input").as_float(minimum=0),
        output=node.require("output").as_float(minimum=0),
        cached_input=cached.as_float(minimum=0) if cached else None,
        cache_write_input=cache_write.as_float(minimum=0) if cache_write else None,
    )


def _static_keys(node: Node | None) -> tuple[StaticKeyConfig, ...]:
    if node is None:
        return ()
    keys: list[StaticKeyConfig] = []
    seen: set[str] = set()
    for entry in node.elements():
        entry.mapping({"id", "sha256", "user", "team", "tags", "models", "expires_at"})
        models, expires = entry.get("models"), entry.get("expires_at")
        key_id = _identifier(entry.require("id"))
        digest_node = entry.require("sha256")
        digest = digest_node.as_str().lower()
        if not SHA256_HEX.match(digest):
            digest_node.fail("must be the 64-hex-digit SHA-256 of the key (`gateway keys hash`)")
        if key_id in seen:
            entry.child("id", None).fail(f"duplicate key id {key_id!r}")
        seen.add(key_id)
        team, tags = entry.get("team"), entry.get("tags")
        keys.append(
            StaticKeyConfig(
                id=key_id,
                sha256=digest,
                user=_identifier(entry.require("user")),
                team=_identifier(team) if team else None,
                tags=tuple(_identifier(tag) for tag in tags.elements()) if tags else (),
                models=tuple(model.as_str() for model in models.elements()) if models else (),
                expires_at=_moment(expires) if expires else None,
            )
        )
    return tuple(keys)


def _quota(node: Node | None) -> QuotaConfig:
    default = QuotaConfig()
    if node is None:
        return default
    node.mapping(
        {
            "policies",
            "default_max_completion_tokens",
            "time_zone",
            "reservation_ttl_seconds",
            "redis_retry_seconds",
        }
    )
    glob, default_max, zone, ttl, retry = (
        node.get(key)
        for key in (
            "policies",
            "default_max_completion_tokens",
            "time_zone",
            "reservation_ttl_seconds",
            "redis_retry_seconds",
        )
    )
    time_zone = zone.as_str() if zone else default.time_zone
    try:
        ZoneInfo(time_zone)
    except (ZoneInfoNotFoundError, ValueError):
        assert zone is not None
        zone.fail(f"unknown time zone {time_zone!r} (use an IANA name such as Europe/Berlin)")
    return QuotaConfig(
        policy_glob=glob.as_str() if glob else default.policy_glob,
        default_max_completion_tokens=default_max.as_int(minimum=1)
        if default_max
        else default.default_max_completion_tokens,
        time_zone=time_zone,
        reservation_ttl_seconds=ttl.as_float(minimum=1) if ttl else default.reservation_ttl_seconds,
        redis_retry_seconds=retry.as_float(minimum=0) if retry else default.redis_retry_seconds,
    )


def _ledger(node: Node | None, base_dir: Path) -> LedgerConfig:
    default = LedgerConfig()
    if node is None:
        return LedgerConfig(spool_dir=base_dir / default.spool_dir)
    keys = ("batch_size", "flush_interval_seconds", "spool_dir", "segment_bytes")
    node.mapping(set(keys))
    size, interval, spool, segment = (node.get(k) for k in keys)
    return LedgerConfig(
        batch_size=size.as_int(minimum=1) if size else default.batch_size,
        flush_interval_seconds=(
            interval.as_float(minimum=0.001) if interval else default.flush_interval_seconds
        ),
        spool_dir=base_dir / (spool.as_str() if spool else default.spool_dir),
        segment_bytes=segment.as_int(minimum=4096) if segment else default.segment_bytes,
    )


CHAT_FORMATS = {"openai", "llama3", "llama4", "anthropic"}
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


def _tokens(node: Node | None, base_dir: Path) -> TokensConfig:
    if node is None:
        return TokensConfig(cache_dir=default_tokenizer_cache(base_dir))
    node.mapping(
        {
            "cache_dir",
            "fallback",
            "rules",
            "bpe_files",
            "learn_calibration",
            "apply_calibration",
            "calibration_min_samples",
            "thread_threshold_bytes",
            "cache_entries",
            "remote_image",
        }
    )
    default = TokensConfig()
    fallback, cache_dir = node.get("fallback"), node.get("cache_dir")
    rules_node = node.get("rules")
    rules = tuple(_token_rule(entry) for entry in rules_node.elements()) if rules_node else ()
    files_node = node.get("bpe_files")
    bpe_files = (
        tuple(_bpe_file(name, entry, base_dir) for name, entry in files_node.items()) if files_node else ()
    )
    width, height = default.remote_image_width, default.remote_image_height
    if (image := node.get("remote_image")) is not None:
        image.mapping({"width", "height"})
        width = image.require("width").as_int(minimum=1)
        height = image.require("height").as_int(minimum=1)

    def flag(key: str, value: bool) -> bool:
        child = node.get(key)
        return child.as_bool() if child else value

    def number(key: str, value: int, minimum: int) -> int:
        child = node.get(key)
        return child.as_int(minimum=minimum) if child else value

    return TokensConfig(
        fallback=fallback.as_str() if fallback else default.fallback,
        rules=rules,
        bpe_files=bpe_files,
        learn_calibration=flag("learn_calibration", default.learn_calibration),
        apply_calibration=flag("apply_calibration", default.apply_calibration),
        calibration_min_samples=number("calibration_min_samples", default.calibration_min_samples, 1),
        thread_threshold_bytes=number("thread_threshold_bytes", default.thread_threshold_bytes, 0),
        cache_entries=number("cache_entries", default.cache_entries, 0),
        remote_image_width=width,
        remote_image_height=height,
        cache_dir=base_dir / cache_dir.as_str() if cache_dir else default_tokenizer_cache(base_dir),
    )


def _token_rule(node: Node) -> TokenRuleConfig:
    node.mapping({"models", "tokenizer", "chat_format", "exact", "factor"})
    models_node = node.require("models")
    if isinstance(models_node.value, list):
        models = tuple(element.as_str() for element in models_node.elements())
    else:
        models = (models_node.as_str(),)
    chat_format, exact, factor = (node.get(key) for key in ("chat_format", "exact", "factor"))
    return TokenRuleConfig(
        models=models,
        tokenizer=node.require("tokenizer").as_str(),
        chat_format=chat_format.as_choice(CHAT_FORMATS) if chat_format else "openai",
        exact=exact.as_bool() if exact else False,
        factor=factor.as_float(minimum=0.01) if factor else 1.0,
    )


def _bpe_file(name: str, node: Node, base_dir: Path) -> BpeFileConfig:
    node.mapping(
        {"path", "package_resource", "pattern", "special_tokens", "reserved_special_tokens", "sha256"}
    )
    path, resource = node.get("path"), node.get("package_resource")
    if (path is None) == (resource is None):
        node.fail("give exactly one of path or package_resource")
    specials = node.get("special_tokens")
    reserved = node.get("reserved_special_tokens")
    sha256 = node.get("sha256")
    if sha256 is not None and not SHA256_HEX.fullmatch(sha256.as_str()):
        sha256.fail("must be 64 hexadecimal digits")
    return BpeFileConfig(
        name=name,
        path=base_dir / path.as_str() if path else None,
        package_resource=resource.as_str() if resource else None,
        pattern=node.require("pattern").as_str(),
        special_tokens=tuple(element.as_str() for element in specials.elements()) if specials else (),
        reserved_special_tokens=reserved.as_int(minimum=0) if reserved else 0,
        sha256=sha256.as_str().lower() if sha256 else None,
    )


def _routing(node: Node | None) -> RoutingConfig:
    default = RoutingConfig()
    if node is None:
        return default
    keys = ("attempts_per_deployment", "backoff_seconds", "breaker_failures", "breaker_cooldown_seconds")
    node.mapping(set(keys))
    attempts, backoff, failures, cooldown = (node.get(key) for key in keys)
    return RoutingConfig(
        attempts_per_deployment=attempts.as_int(minimum=1) if attempts else default.attempts_per_deployment,
        backoff_seconds=backoff.as_float(minimum=0) if backoff else default.backoff_seconds,
        breaker_failures=failures.as_int(minimum=1) if failures else default.breaker_failures,
        breaker_cooldown_seconds=cooldown.as_float(minimum=0)
        if cooldown
        else default.breaker_cooldown_seconds,
    )


def _metrics(node: Node | None) -> bool:
    if node is None:
        return False
    node.mapping({"team_labels"})
    team_labels = node.get("team_labels")
    return team_labels.as_bool() if team_labels else False


def _console(node: Node | None) -> ConsoleConfig:
    default = ConsoleConfig()
    if node is None:
        return default
    keys = ("enabled", "idle_timeout_seconds", "session_lifetime_seconds", "secure_cookies")
    node.mapping(set(keys))
    enabled, idle, lifetime, secure = (node.get(key) for key in keys)
    config = ConsoleConfig(
        enabled=enabled.as_bool() if enabled else default.enabled,
        idle_timeout_seconds=idle.as_float(minimum=1) if idle else default.idle_timeout_seconds,
        session_lifetime_seconds=(
            lifetime.as_float(minimum=1) if lifetime else default.session_lifetime_seconds
        ),
        secure_cookies=secure.as_choice({"auto", "always"}) if secure else default.secure_cookies,
    )
    if lifetime is not None and config.session_lifetime_seconds < config.idle_timeout_seconds:
        lifetime.fail("must be at least idle_timeout_seconds")
    return config


def _admin(node: Node | None) -> str | None:
    if node is None:
        return None
    node.mapping({"key_sha256", "host", "port"})
    digest_node = node.require("key_sha256")
    digest = digest_node.as_str().lower()
    if not SHA256_HEX.match(digest):
        digest_node.fail("must be the 64-hex-digit SHA-256 of the admin key (`gateway keys hash`)")
    return digest


def _admin_address(node: Node | None) -> tuple[str, int] | None:
    port = node.get("port") if node is not None else None
    if node is None or port is None:
        return None
    host = node.get("host")
    return (host.as_str() if host else "127.0.0.1", port.as_int(minimum=0))


def _nonempty(node: Node) -> str:
    value = node.as_str()
    if not value:
        node.fail("must not be empty")
    return value


def _identifier(node: Node) -> str:
    value = node.as_str()
    if not IDENTIFIER.match(value):
        node.fail("may use letters, digits and . _ @ + - (at most 128 characters)")
    return value
