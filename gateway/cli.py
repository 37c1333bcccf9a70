"""The `gateway` command: serve, migrate, keys."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import resource
import ssl
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway import __version__
from gateway.auth import hash_key
from gateway.config import GatewayConfig, TokensConfig, load_config
from gateway.ledger import LedgerStore, open_store
from gateway.ledger.schema import SchemaTooNew
from gateway.logs import TextHandler, setup_logging
from gateway.tokens import ROUTES
from gateway.tokens.errors import TokenizerUnavailable
from gateway.tokens.files import ENCODING_FILES
from gateway.yamlnode import ConfigError

EXIT_CONFIG = 2
EXIT_FAILURE = 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Redacted lines on stderr for every command; `serve` then sets its own level and format.
    logging.basicConfig(level=logging.INFO, handlers=[TextHandler()])
    try:
        command: Callable[[argparse.Namespace], int] = args.run
        return command(args)
    except ConfigError as exc:
        print(f"gateway: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except SchemaTooNew as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except TokenizerUnavailable as exc:
        # Missing tokenizer files above all: one line naming `gateway tokenizers fetch`.
        print(f"gateway: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="LLM API gateway")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(
        group: Any, name: str, run: Callable[[argparse.Namespace], int], help_text: str
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(name, help=help_text)
        sub.add_argument("--config", default="gateway.yaml", help="path to gateway.yaml")
        sub.set_defaults(run=run)
        return sub

    serve = command(commands, "serve", _serve, "run the gateway")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    command(commands, "migrate", _migrate, "apply database migrations")
    command(commands, "check", _check, "validate gateway.yaml and the policy files, then exit")
    doctor = command(
        commands, "doctor", _doctor, "check the database, Redis, tokenizers and upstreams; name fixes"
    )
    doctor.add_argument("--json", action="store_true")

    keys = commands.add_parser("keys", help="manage gateway API keys").add_subparsers(
        dest="keys_command", required=True
    )
    usage = command(commands, "usage", _usage, "usage report from the daily rollups")
    usage.add_argument("--by", default="user", choices=["key", "user", "team", "model", "day"])
    usage.add_argument("--since", help="first day, YYYY-MM-DD (default: the 1st of this month, UTC)")
    usage.add_argument("--until", help="day after the last, YYYY-MM-DD (default: tomorrow)")
    usage.add_argument("--format", default="table", choices=["table", "csv", "json"])

    quota = commands.add_parser("quota", help="inspect and reset quota counters").add_subparsers(
        dest="quota_command", required=True
    )
    for name, run, text in (
        ("show", _quota_show, "limits, used, reserved, remaining and reset of a key, user or team"),
        ("reset", _quota_reset, "zero the counters of a key, user or team"),
    ):
        sub = command(quota, name, run, text)
        sub.add_argument("scope", choices=["key", "user", "team"])
        sub.add_argument("subject", help="the key id, user or team")
        if name == "show":
            sub.add_argument("--json", action="store_true")

    policy = commands.add_parser("policy", help="policy tools").add_subparsers(
        dest="policy_command", required=True
    )
    check_policies = command(policy, "check", _policy_check, "validate policy files offline")
    check_policies.add_argument("directory", nargs="?", help="folder of *.yaml (default: the config's glob)")

    tokens = commands.add_parser("tokens", help="token counting tools").add_subparsers(
        dest="tokens_command", required=True
    )
    count = command(tokens, "count", _tokens_count, "count the prompt tokens of a request body")
    count.add_argument("file", nargs="?", default="-", help="the JSON body; '-' (default) reads stdin")
    count.add_argument("--model", help="model name (default: the body's 'model')")
    count.add_argument("--route", choices=ROUTES, help="default: from the body's fields")
    count.add_argument("--json", action="store_true", help="machine-readable output")

    tokenizers = commands.add_parser("tokenizers", help="tokenizer files").add_subparsers(
        dest="tokenizers_command", required=True
    )
    fetch = command(
        tokenizers, "fetch", _tokenizers_fetch, "download and check the tiktoken files into tokens.cache_dir"
    )
    fetch.add_argument("--cache-dir", help="where to put them (default: tokens.cache_dir of --config)")
    fetch.add_argument(
        "--from",
        dest="source",
        metavar="URL_OR_DIR",
        help="a mirror's base URL (BASE/o200k_base.tiktoken) or a folder holding the files",
    )
    fetch.add_argument(
        "--encoding",
        dest="encodings",
        action="append",
        default=[],
        choices=list(ENCODING_FILES),
        metavar="NAME",
        help="also this encoding (repeatable): " + ", ".join(ENCODING_FILES) + ". "
        "Without it: cl100k_base, o200k_base and those the --config's models use",
    )

    create = command(keys, "create", _keys_create, "create a key (printed once)")
    create.add_argument("--user", required=True)
    create.add_argument("--team")
    create.add_argument("--tag", action="append", default=[], help="a tag policies can match (repeatable)")
    create.add_argument(
        "--model", action="append", default=[], help="limit the key to this model (repeatable)"
    )
    create.add_argument("--expires-in", help="lifetime, e.g. 90d, 12h, 30m (default: never)")
    rotate = command(
        keys, "rotate", _keys_rotate, "issue a successor key; the old one works for a grace period"
    )
    rotate.add_argument("key_id")
    rotate.add_argument("--grace", default="24h", help="how long the old key keeps working (default 24h)")
    command(keys, "list", _keys_list, "list keys (ids and owners, never the keys)")
    revoke = command(keys, "revoke", _keys_revoke, "revoke a key by id")
    revoke.add_argument("key_id")
    hasher = keys.add_parser("hash", help="print the SHA-256 of a key, for static keys in gateway.yaml")
    hasher.add_argument("key", help="the key; '-' reads it from standard input")
    hasher.set_defaults(run=_keys_hash)
    return parser


def _load(args: argparse.Namespace) -> GatewayConfig:
    return load_config(args.config)


def _serve(args: argparse.Namespace) -> int:
    from gateway import connections
    from gateway.app import create_app

    config = _load(args)
    setup_logging(config.server.log_level, config.server.log_json)
    if not args.worker:
        # Before any worker starts: one clear line, not one per worker restarted.
        _require_tokenizer_files(config)
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    open_files = _raise_open_file_limit()
    if config.server.workers > 1 and not args.worker:
        from gateway.workers import supervise

        return supervise(str(config.path), host, port, config.server.workers)
    app = create_app(config)
    app.on_startup.append(_settle_memory)
    loop, loop_name = _event_loop()

    def serving(site: connections.GuardedSite) -> None:
        # Only once every resource is open (the database migrated, the quota store and the
        # ledger ready) and the socket is bound: a port in use never logs "listening".
        logging.getLogger("gateway").info(
            "gateway %s listening on %s (%s, %s open files)", __version__, site.name, loop_name, open_files
        )

    # web.run_app's loop, with each connection's header deadline, header size bound and
    # per-address limit (gateway/connections.py). Cancel the handler of a client that
    # left, so its upstream call stops too; the request path settles and records in a
    # task of its own, which is not cancelled.
    connections.run(
        app,
        config.server,
        host,
        port,
        loop=loop,
        ssl_context=_tls(config),
        reuse_port=args.worker,
        on_serving=serving,
        shutdown_timeout=30,
        handler_cancellation=True,
    )
    return 0


def _raise_open_file_limit() -> int:
    """Lifts the soft limit of open files to the hard one; returns the limit now in force.

    Each call in flight holds two sockets (the client's and the provider's), and model
    calls last long. systemd starts services with a soft limit of 1,024, so without this
    the gateway would refuse connections past some 500 calls at once.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError):  # above the kernel's nr_open: keep what was given
        return soft
    return wanted


def _event_loop() -> tuple[asyncio.AbstractEventLoop, str]:
    try:
        import uvloop
    except ImportError:  # not built for this platform
        return asyncio.new_event_loop(), "asyncio event loop"
    return uvloop.new_event_loop(), "uvloop"


async def _settle_memory(app: web.Application) -> None:
    """Runs once every resource is open: what exists now lives as long as the process."""
    # A full collection walks every tracked object; frozen ones are skipped, so the
    # configuration, tokenizer tables and modules never cost a pause again.
    gc.collect()
    gc.freeze()
    # A request leaves few cycles behind; collecting the young generation every 700
    # allocations (the default) mostly walks objects that refcounting frees anyway.
    gc.set_threshold(20_000, 20, 20)
    # Give the start-up's temporaries (tokenizer files, parsing) back to the system.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _tls(config: GatewayConfig) -> ssl.SSLContext | None:
    server = config.server
    if server.tls_cert_file is None or server.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(server.tls_cert_file, server.tls_key_file)
    return context


def _doctor(args: argparse.Namespace) -> int:
    from gateway.doctor import as_json, diagnose, render

    config = _load(args)
    checks = asyncio.run(diagnose(config))
    print(json.dumps(as_json(checks), default=str) if args.json else render(checks))
    return EXIT_FAILURE if any(check.status == "fail" for check in checks) else 0


def _check(args: argparse.Namespace) -> int:
    from gateway.policies import PolicyHolder

    config = _load(args)
    holder = PolicyHolder(config.base_dir, config.quota.policy_glob)
    _require_tokenizer_files(config)
    print(
        f"{config.path}: ok ({len(config.models)} models, {len(config.providers)} providers, "
        f"{len(holder.current.policies)} policies in {len(holder.current.files)} files)"
    )
    return 0


def _require_tokenizer_files(config: GatewayConfig) -> None:
    """Raises TokenizerFilesMissing unless the tiktoken files the models use are in the cache, checked."""
    from gateway.tokens.files import require_cached
    from gateway.tokens.in_use import encodings_in_use
    from gateway.tokens.registry import TokenizerRegistry

    require_cached(TokenizerRegistry(config.tokens).cache_dir, encodings_in_use(config))


def _tokenizers_fetch(args: argparse.Namespace) -> int:
    from gateway.config import default_tokenizer_cache
    from gateway.tokens.fetch import encodings_to_fetch, fetch_encoding_files
    from gateway.tokens.in_use import encodings_in_use
    from gateway.tokens.registry import builtin_file_problems

    config = _load(args) if Path(args.config).exists() else None
    if args.cache_dir is not None:
        cache_dir = Path(args.cache_dir).resolve()
    elif config is not None:
        cache_dir = config.tokens.cache_dir or default_tokenizer_cache(Path.cwd())
    else:
        cache_dir = default_tokenizer_cache(Path.cwd()).resolve()
    encodings = encodings_to_fetch(encodings_in_use(config) if config is not None else (), args.encodings)
    print(f"tokenizer cache: {cache_dir}")
    outcomes = asyncio.run(fetch_encoding_files(cache_dir, args.source, encodings))
    for outcome in outcomes:
        print(f"{outcome.encoding}: {outcome.status}: {outcome.detail}")
    for name, problem in builtin_file_problems().items():
        # Not fetched: they come with the llama-models package, or not at all.
        state = "Meta's file from llama-models, sha256 checked" if problem is None else problem
        print(f"{name}: {state}")
    return EXIT_FAILURE if any(outcome.status == "failed" for outcome in outcomes) else 0


def _usage(args: argparse.Namespace) -> int:
    from gateway.ledger.report import ReportError, period, render

    try:
        since, until = period(args.since, args.until)
    except ReportError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    async def report(store: LedgerStore) -> int:
        print(render(await store.usage_report(args.by, since, until), args.by, args.format))
        return 0

    return _with_store(args, report)


def _quota_command(args: argparse.Namespace, reset: bool) -> int:
    from gateway.policies import PolicyHolder
    from gateway.quota.limiter import QuotaLimiter, QuotaStoreUnavailable
    from gateway.quota.report import reading_json, readings_table
    from gateway.quota.store import open_redis

    config = _load(args)
    if config.backends.redis is None:
        # Not a failure of the store but of this configuration for this command: the
        # counters exist only inside `gateway serve`, which answers for them over HTTP.
        print(_embedded_quota_guidance(config, args.scope, args.subject, reset), file=sys.stderr)
        return EXIT_CONFIG
    limits = PolicyHolder(config.base_dir, config.quota.policy_glob).current.limits_of_subject(
        args.scope, args.subject
    )

    async def run() -> int:
        redis, _ = open_redis(config.backends.redis)
        assert config.backends.redis is not None
        limiter = QuotaLimiter(redis, config.backends.redis.key_prefix, time_zone=config.quota.time_zone)
        try:
            if reset:
                deleted = await limiter.reset(limits)
                print(f"reset {len(limits)} limits of {args.scope} {args.subject} ({deleted} keys deleted)")
                return 0
            readings = await limiter.read(limits)
        except QuotaStoreUnavailable as exc:
            print(f"gateway: Redis is unreachable: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        finally:
            await redis.aclose()
        if args.json:
            print(
                json.dumps(
                    {
                        "scope": args.scope,
                        "subject": args.subject,
                        "limits": [reading_json(r) for r in readings],
                    }
                )
            )
        elif not readings:
            print(f"no policy limits {args.scope} {args.subject}")
        else:
            print(readings_table(readings))
        return 0

    return asyncio.run(run())


def _embedded_quota_guidance(config: GatewayConfig, scope: str, subject: str, reset: bool) -> str:
    """What to run instead of `gateway quota show|reset` when the quota store is embedded:
    curl lines for the running gateway, at its configured address."""
    from shlex import quote as shell_quote
    from urllib.parse import quote as url_quote

    def base_url(host: str, port: int) -> str:
        if host in ("", "0.0.0.0", "::"):  # listening everywhere: this machine answers too
            host = "127.0.0.1"
        scheme = "https" if config.server.tls_cert_file is not None else "http"
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"

    public = base_url(config.server.host, config.server.port)
    admin = base_url(*config.admin_address) if config.admin_address is not None else public
    admin_url = shell_quote(f"{admin}/admin/quota/{scope}/{url_quote(subject, safe='@+')}")
    own_url = shell_quote(f"{public}/v1/quota")
    lines = [
        f"gateway: {config.path} has no backends.redis: its quota store is embedded in the serving",
        f"process, where `gateway quota` cannot {'reset' if reset else 'read'} it. Ask the running gateway:",
    ]
    if config.admin_key_sha256 is None:
        lines.append(
            "  (the admin API is off: add `admin: {key_sha256: ...}` to the config, the hash from "
            "`gateway keys hash KEY`, and restart)"
        )
    method = "-X DELETE " if reset else ""
    lines.append(f'  curl -sS {method}-H "Authorization: Bearer $GATEWAY_ADMIN_KEY" {admin_url}')
    lines.append("    GATEWAY_ADMIN_KEY: the admin key (the one whose SHA-256 is admin.key_sha256)")
    if not reset:
        lines.append(f'  curl -sS -H "Authorization: Bearer $GATEWAY_KEY" {own_url}')
        lines.append("    GATEWAY_KEY: a caller's key: that caller's own limits")
    return "\n".join(lines)


def _quota_show(args: argparse.Namespace) -> int:
    return _quota_command(args, reset=False)


def _quota_reset(args: argparse.Namespace) -> int:
    return _quota_command(args, reset=True)


def _policy_check(args: argparse.Namespace) -> int:
    from gateway.policies import check_policy_files

    if args.directory is not None:
        files = sorted(Path(args.directory).glob("*.yaml")) + sorted(Path(args.directory).glob("*.yml"))
    else:
        config = _load(args)
        files = sorted(config.base_dir.glob(config.quota.policy_glob))
    if not files:
        print("gateway: no policy files found", file=sys.stderr)
        return EXIT_CONFIG
    checks = check_policy_files(files)
    for check in checks:
        print(f"error: {check.error}" if check.error else f"ok:    {check.path} ({check.policies} policies)")
    return EXIT_CONFIG if any(check.error for check in checks) else 0


def _with_store(args: argparse.Namespace, work: Callable[[LedgerStore], Awaitable[int]]) -> int:
    config = _load(args)

    async def run() -> int:
        store = open_store(config.backends)
        await store.open()
        try:
            await store.migrate()
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())


def _migrate(args: argparse.Namespace) -> int:
    config = _load(args)

    async def run() -> int:
        store = open_store(config.backends)
        await store.open()
        try:
            applied = await store.migrate()
            version = await store.schema_version()
        finally:
            await store.close()
        done = f"applied {', '.join(map(str, applied))}" if applied else "nothing to apply"
        print(f"{store.description}: schema version {version} ({done})")
        return 0

    return asyncio.run(run())


def _keys_create(args: argparse.Namespace) -> int:
    from gateway.keys import KeyRequestError, new_key

    try:
        expires_in = _duration(args.expires_in) if args.expires_in else None
        issued = new_key(args.user, args.team, args.tag, args.model, expires_in)
    except KeyRequestError as exc:
        print(f"gateway: --{exc.field} {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    record = issued.record

    async def create(store: LedgerStore) -> int:
        await store.insert_key(record)
        return 0

    status = _with_store(args, create)
    print(f"key id: {record.key_id}\nuser:   {record.user}\nteam:   {record.team or '-'}")
    print(f"tags:   {', '.join(record.tags) or '-'}")
    print(f"key:    {issued.key}\n(shown once: store it now; the gateway keeps only its hash)")
    return status


def _duration(text: str) -> timedelta:
    from gateway.keys import KeyRequestError, parse_duration

    try:
        return parse_duration(text)
    except KeyRequestError as exc:
        raise SystemExit(f"gateway: {exc.message}") from exc


def _keys_rotate(args: argparse.Namespace) -> int:
    from gateway.keys import rotate_key

    grace = _duration(args.grace)

    async def rotate(store: LedgerStore) -> int:
        rotation = await rotate_key(store, args.key_id, grace)
        if rotation is None:
            print(f"gateway: no active key with id {args.key_id}", file=sys.stderr)
            return EXIT_FAILURE
        successor = rotation.successor.record
        print(f"key id: {successor.key_id}\nuser:   {successor.user}\nteam:   {successor.team or '-'}")
        until = rotation.old_key_ends.isoformat(timespec="seconds")
        print(f"key:    {rotation.successor.key}")
        print(f"(shown once; the old key {rotation.old_key_id} works until {until})")
        return 0

    return _with_store(args, rotate)


def _keys_list(args: argparse.Namespace) -> int:
    async def show(store: LedgerStore) -> int:
        keys = await store.list_keys()
        print(f"{'KEY ID':<18} {'USER':<20} {'TEAM':<16} {'CREATED':<20} STATE")
        for key in keys:
            state = "revoked " + key.revoked_at.strftime("%Y-%m-%d") if key.revoked_at else "active"
            created = key.created_at.strftime("%Y-%m-%d %H:%M")
            print(f"{key.key_id:<18} {key.user:<20} {key.team or '-':<16} {created:<20} {state}")
        return 0

    return _with_store(args, show)


def _keys_revoke(args: argparse.Namespace) -> int:
    async def revoke(store: LedgerStore) -> int:
        if await store.revoke_key(args.key_id):
            print(f"revoked {args.key_id}")
            return 0
        print(f"gateway: no active key with id {args.key_id}", file=sys.stderr)
        return EXIT_FAILURE

    return _with_store(args, revoke)


def _tokens_count(args: argparse.Namespace) -> int:
    from gateway.count_routes import route_of
    from gateway.errors import GatewayError
    from gateway.metrics import Metrics
    from gateway.tokens import Calibration, PromptCounter, TokenizerFilesMissing, TokenizerRegistry

    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    try:
        body = json.loads(text)
    except ValueError as exc:
        print(f"gateway: the body is not valid JSON: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if not isinstance(body, dict):
        print("gateway: the body must be a JSON object", file=sys.stderr)
        return EXIT_CONFIG
    config_path = Path(args.config)
    config = load_config(config_path) if config_path.exists() else None
    tokens_config = config.tokens if config is not None else TokensConfig()
    name = args.model or body.get("model")
    if not isinstance(name, str) or not name:
        print("gateway: give --model or a 'model' in the body", file=sys.stderr)
        return EXIT_CONFIG
    alias = config.models.get(name) if config is not None else None
    upstream = alias.upstream_model if alias is not None else name
    counter = PromptCounter(TokenizerRegistry(tokens_config), Calibration(tokens_config, Metrics()))
    try:
        profile = counter.registry.profile(upstream, alias.tokenizer if alias is not None else None)
        route = args.route or route_of(body)
        count = counter.finish(counter.count_raw(route, body, profile), profile, route)
    except TokenizerFilesMissing:
        raise  # main's one line naming `gateway tokenizers fetch`
    except (GatewayError, KeyError, TypeError, TokenizerUnavailable) as exc:
        message = exc.message if isinstance(exc, GatewayError) else f"cannot count: {exc}"
        print(f"gateway: {message}", file=sys.stderr)
        return EXIT_CONFIG
    if args.json:
        print(
            json.dumps(
                {
                    "model": name,
                    "upstream_model": upstream,
                    "route": route,
                    "prompt_tokens": count.tokens,
                    "raw_tokens": count.raw_tokens,
                    "exact": count.exact,
                    "tokenizer": count.tokenizer,
                    "factor": count.factor,
                    "method": count.method,
                    "reason": count.reason,
                }
            )
        )
        return 0
    how = "exact" if count.exact else f"estimate: {count.raw_tokens} counted x {count.factor:g}"
    print(f"prompt tokens: {count.tokens} ({how})")
    print(f"tokenizer:     {count.tokenizer}")
    print(f"method:        {count.method}")
    print(f"why:           {count.reason}")
    print(f"model:         {name}" + (f" (upstream {upstream})" if upstream != name else ""))
    return 0


def _keys_hash(args: argparse.Namespace) -> int:
    key = sys.stdin.readline().strip() if args.key == "-" else args.key
    print(hash_key(key))
    return 0
