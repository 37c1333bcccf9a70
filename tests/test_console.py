"""The operators' console (/ui/) through a real gateway: real Redis and PostgreSQL, or the
embedded store and SQLite; a browser-like client (cookies kept, forms posted with their
CSRF tokens); keys used through the OpenAI SDK against the fake provider."""

from __future__ import annotations

import asyncio
import re
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest
import trustme
from aiohttp.test_utils import TestServer
from multidict import CIMultiDictProxy

from gateway import state
from gateway.app import create_app
from gateway.config import load_config
from gateway.console.security import CONTENT_SECURITY_POLICY
from tests.conftest import ADMIN_KEY, T0_MS, ConfigWriter, RunningGateway, StartGateway, _sha256, free_port
from tests.fakes.openai_upstream import FakeUpstream

HI = [{"role": "user", "content": "Say hello to the console."}]
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
PAGES = ("/ui/", "/ui/?period=month", "/ui/usage", "/ui/usage?by=day", "/ui/keys", "/ui/quotas")
PAGES += ("/ui/policies", "/ui/health", "/ui/quotas/user/alice/reset", "/ui/usage.csv")
POLICIES = """
policies:
  - name: per-user
    scope: user
    limits:
      - {requests: 1000, per: minute}
      - {tokens: 1000000, per: minute}
  - name: per-team
    scope: team
    limits:
      - {tokens: 5000000, per: minute}
"""
CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]*)"')


@dataclass
class Page:
    status: int
    headers: CIMultiDictProxy[str]
    text: str

    @property
    def set_cookies(self) -> list[str]:
        return self.headers.getall("Set-Cookie", [])

    @property
    def csrf_token(self) -> str:
        found = CSRF_FIELD.search(self.text)
        assert found is not None, self.text[:2000]
        return found[1]


@dataclass
class Browser:
    """What a browser does with the console: keeps its cookies, posts forms with their tokens."""

    base: str
    session: aiohttp.ClientSession
    tls: ssl.SSLContext | None = None
    pages: list[Page] = field(default_factory=list)

    async def get(self, path: str) -> Page:
        async with self.session.get(self.base + path, allow_redirects=False, ssl=self.tls) as response:
            page = Page(response.status, response.headers, await response.text())
        self.pages.append(page)
        return page

    async def post(self, path: str, fields: dict[str, str]) -> Page:
        async with self.session.post(
            self.base + path, data=fields, allow_redirects=False, ssl=self.tls
        ) as response:
            page = Page(response.status, response.headers, await response.text())
        self.pages.append(page)
        return page

    async def login(self, key: str = ADMIN_KEY) -> Page:
        form = await self.get("/ui/login")
        return await self.post("/ui/login", {"csrf_token": form.csrf_token, "admin_key": key, "next": "/ui/"})

    async def submit(self, page_path: str, action: str, fields: dict[str, str] | None = None) -> Page:
        """Post a form of `page_path` to `action` with the token that page carries."""
        page = await self.get(page_path)
        assert page.status == 200, page.text[:2000]
        return await self.post(action, {"csrf_token": page.csrf_token, **(fields or {})})


NewBrowser = Callable[..., Browser]


@pytest.fixture
async def browser() -> AsyncIterator[NewBrowser]:
    sessions: list[aiohttp.ClientSession] = []

    def make(base: str, tls: ssl.SSLContext | None = None) -> Browser:
        # unsafe: cookies of an IP address (127.0.0.1) are kept, as a browser keeps them.
        session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        sessions.append(session)
        return Browser(base, session, tls)

    yield make
    for session in sessions:
        await session.close()


def cell(text: str, row: str, column: str) -> str:
    """The data-value of `column` in the table row whose first attribute is `row`
    (e.g. 'data-name="alice"')."""
    found = re.search(rf"<tr {re.escape(row)}.*?</tr>", text, re.DOTALL)
    assert found is not None, f"no row {row}"
    value = re.search(rf'data-column="{column}" data-value="([^"]*)"', found[0])
    assert value is not None, f"no {column} in row {row}"
    return value[1]


def quota_cell(text: str, scope: str, subject: str, limit: str, column: str) -> str:
    section = re.search(
        rf'<section class="card subject" id="quota-{scope}-{re.escape(subject)}".*?</section>',
        text,
        re.DOTALL,
    )
    assert section is not None, f"no quota section for {scope} {subject}"
    return cell(section[0], f'data-limit="{limit}"', column)


def key_from(page: Page) -> tuple[str, str]:
    key = re.search(r'id="new-key" value="([^"]+)"', page.text)
    key_id = re.search(r'id="new-key-id">([^<]+)<', page.text)
    assert key is not None and key_id is not None, page.text[:3000]
    return key[1], key_id[1]


async def start(start_gateway: StartGateway, backend: str, **options: Any) -> RunningGateway:
    return await start_gateway(POLICIES, embedded=backend == "embedded", **options)


BACKENDS = ["embedded", "postgres"]


@pytest.fixture
async def clean_database(pg: asyncpg.Connection) -> asyncpg.Connection:
    exists = await pg.fetchval("SELECT to_regclass('console_sessions')")
    if exists is not None:
        await pg.execute("TRUNCATE console_sessions")
    return pg


# ---------------------------------------------------------------- login and sessions


async def test_a_wrong_key_stays_on_the_login_page_and_failures_are_throttled(
    start_gateway: StartGateway,
    config_writer: ConfigWriter,
    clean_database: asyncpg.Connection,
    browser: NewBrowser,
) -> None:
    config_writer.extra = "server: {auth_failures_per_minute: 3}\n"
    gateway = await start(start_gateway, "postgres")
    client = browser(gateway.url)
    for _ in range(3):
        page = await client.login("gw-wrong-admin-key")
        assert page.status == 401
        assert 'id="admin_key"' in page.text and "Incorrect admin key." in page.text
        assert not any(c.startswith("gw_console=") for c in page.set_cookies)
    # The fourth try from this address is not even checked: not with the right key either.
    for key in ("gw-wrong-admin-key", ADMIN_KEY):
        page = await client.login(key)
        assert page.status == 429
        assert "Too many failed logins from this address" in page.text
        assert 1 <= int(page.headers["Retry-After"]) <= 60
        assert not any(c.startswith("gw_console=") for c in page.set_cookies)
    assert (await client.get("/ui/")).status == 303
    assert await clean_database.fetchval("SELECT count(*) FROM console_sessions") == 0


async def test_the_right_key_signs_in_with_exact_cookie_flags(
    start_gateway: StartGateway, clean_database: asyncpg.Connection, browser: NewBrowser
) -> None:
    gateway = await start(start_gateway, "postgres")
    client = browser(gateway.url)
    form = await client.get("/ui/login")
    login_cookie = next(c for c in form.set_cookies if c.startswith("gw_console_login="))
    assert re.fullmatch(
        r"gw_console_login=[A-Za-z0-9_-]{43}; HttpOnly; Path=/ui/; SameSite=Strict", login_cookie
    )
    page = await client.post(
        "/ui/login", {"csrf_token": form.csrf_token, "admin_key": ADMIN_KEY, "next": "/ui/keys"}
    )
    assert page.status == 303 and page.headers["Location"] == "/ui/keys"
    session_cookie = next(c for c in page.set_cookies if c.startswith("gw_console="))
    assert re.fullmatch(r"gw_console=[A-Za-z0-9_-]{43}; HttpOnly; Path=/ui/; SameSite=Strict", session_cookie)
    cleared = next(c for c in page.set_cookies if c.startswith("gw_console_login="))
    assert cleared == (
        'gw_console_login=""; expires=Thu, 01 Jan 1970 00:00:00 GMT; HttpOnly; Max-Age=0; Path=/ui/; SameSite=Strict'
    )
    # Only the session id's SHA-256 is stored.
    session_id = session_cookie.split(";")[0].split("=", 1)[1]
    stored = await clean_database.fetch("SELECT session_sha256 FROM console_sessions")
    assert [row["session_sha256"] for row in stored] == [_sha256(session_id)]
    # A `next` that leaves the console is not followed.
    other = browser(gateway.url)
    form = await other.get("/ui/login")
    page = await other.post(
        "/ui/login", {"csrf_token": form.csrf_token, "admin_key": ADMIN_KEY, "next": "//evil.example/"}
    )
    assert page.headers["Location"] == "/ui/"


async def test_cookies_are_secure_under_tls(
    config_writer: ConfigWriter, clean_database: asyncpg.Connection, browser: NewBrowser
) -> None:
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    app = create_app(load_config(config_writer.write(POLICIES)))
    server = TestServer(app)
    await server.start_server(ssl=server_context)
    try:
        client = browser(str(server.make_url("")).rstrip("/"), client_context)
        assert client.base.startswith("https://")
        form = await client.get("/ui/login")
        assert any(
            re.fullmatch(r"gw_console_login=\S+; HttpOnly; Path=/ui/; SameSite=Strict; Secure", c)
            for c in form.set_cookies
        )
        page = await client.login()
        assert page.status == 303
        session_cookie = next(c for c in page.set_cookies if c.startswith("gw_console="))
        assert re.fullmatch(
            r"gw_console=[A-Za-z0-9_-]{43}; HttpOnly; Path=/ui/; SameSite=Strict; Secure", session_cookie
        )
        assert (await client.get("/ui/")).status == 200
    finally:
        await server.close()


async def test_secure_cookies_always_marks_them_over_plain_http(
    start_gateway: StartGateway,
    config_writer: ConfigWriter,
    clean_database: asyncpg.Connection,
    browser: NewBrowser,
) -> None:
    config_writer.extra = "console: {secure_cookies: always}\n"
    gateway = await start(start_gateway, "postgres")
    client = browser(gateway.url)
    form = await client.get("/ui/login")
    login_cookie = next(c for c in form.set_cookies if c.startswith("gw_console_login="))
    assert login_cookie.endswith("; HttpOnly; Path=/ui/; SameSite=Strict; Secure")
    # A browser behind the TLS-terminating proxy sends it back (ours would not, over http).
    fields = {"csrf_token": form.csrf_token, "admin_key": ADMIN_KEY, "next": "/ui/"}
    async with client.session.post(
        f"{gateway.url}/ui/login",
        data=fields,
        headers={"Cookie": login_cookie.split(";")[0]},
        allow_redirects=False,
    ) as response:
        assert response.status == 303
        session_cookie = next(c for c in response.headers.getall("Set-Cookie") if c.startswith("gw_console="))
    assert session_cookie.endswith("; HttpOnly; Path=/ui/; SameSite=Strict; Secure")


@pytest.mark.parametrize("backend", BACKENDS)
async def test_every_page_answers_with_a_session_and_sends_to_login_without(
    backend: str, start_gateway: StartGateway, clean_database: asyncpg.Connection, browser: NewBrowser
) -> None:
    gateway = await start(start_gateway, backend)
    anonymous = browser(gateway.url)
    for path in PAGES:
        page = await anonymous.get(path)
        assert page.status == 303, path
        assert page.headers["Location"].startswith("/ui/login?next=/ui/"), path
    assert (await anonymous.get("/ui/static/console.js")).status == 200
    typed = await anonymous.get("/ui")
    assert (typed.status, typed.headers["Location"]) == (308, "/ui/")
    assert (await anonymous.get("/ui/static/vendor/uPlot.iife.min.js")).status == 200
    signed_in = browser(gateway.url)
    assert (await signed_in.login()).status == 303
    for path in PAGES:
        page = await signed_in.get(path)
        assert page.status == 200, (path, page.text[:3000])
    assert (await signed_in.get("/ui/no-such-page")).status == 404


async def test_the_login_page_sends_a_signed_in_browser_on(
    start_gateway: StartGateway, clean_database: asyncpg.Connection, browser: NewBrowser
) -> None:
    gateway = await start(start_gateway, "postgres")
    client = browser(gateway.url)
    await client.login()
    page = await client.get("/ui/login?next=/ui/health")
    assert page.status == 303 and page.headers["Location"] == "/ui/health"


async def test_every_answer_carries_the_content_security_policy(
    start_gateway: StartGateway, clean_database: asyncpg.Connection, browser: NewBrowser
) -> None:
    assert CONTENT_SECURITY_POLICY == CSP
    gateway = await start(start_gateway, "postgres")
    client = browser(gateway.url)
    await client.get("/ui/")  # 303
    await client.get("/ui/login")
    await client.get("/ui/static/console.css")
    await client.post("/ui/keys", {"user": "x"})  # 403
    await client.post("/ui/login", {"admin_key": ADMIN_KEY})  # 403: no login token
    await client.login()
    for path in (*PAGES, "/ui/nothing-here", "/ui/static/missing.js"):
        await client.get(path)
    await client.post("/ui/policies/reload", {"csrf_token": "wrong"})
    await client.submit("/ui/keys", "/ui/keys", {"user": ""})  # 400
    await client.submit("/ui/", "/ui/logout")
    assert {page.status for page in client.pages} >= {200, 303, 400, 403, 404}
    for page in client.pages:
        assert page.headers["Content-Security-Policy"] == CSP
        assert page.headers["X-Content-Type-Options"] == "nosniff"
        assert page.headers["Referrer-Policy"] == "no-referrer"
        assert page.headers["Cache-Control"] in ("no-store", "no-cache")
        if "text/html" in page.headers.get("Content-Type", ""):
            assert page.headers["Cache-Control"] == "no-store"
            # No inline script, style or event handler: only our own files.
            assert not re.search(
                r"<script(?![^>]*\b(src=\"/ui/static/|type=\"application/json\"))", page.text
            )
            assert "<style" not in page.text and " style=" not in page.text
            assert not re.search(r"\son[a-z]+=", page.text)


async def test_posts_without_or_with_a_wrong_csrf_token_are_refused_and_change_nothing(
    start_gateway: StartGateway, clean_database: asyncpg.Connection, browser: NewBrowser
) -> None:
    gateway = await start(start_gateway, "postgres", clock_ms=lambda: T0_MS)
    client = browser(gateway.url)
    await client.login()
    created = await client.submit("/ui/keys", "/ui/keys", {"user": "dora", "team": "research"})
    key, key_id = key_from(created)
    await gateway.client(key=key).chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=5)
    await gateway.settle()
    quotas_before = (await client.get("/ui/quotas")).text
    used_before = quota_cell(quotas_before, "user", "dora", "per-user:tokens:minute", "used")
    assert int(used_before) > 0
    keys_before = await clean_database.fetch("SELECT * FROM api_keys ORDER BY key_id")
    posts = {
        "/ui/keys": {"user": "mallory"},
        f"/ui/keys/{key_id}/revoke": {},
        f"/ui/keys/{key_id}/rotate": {"grace": "1h"},
        "/ui/quotas/user/dora/reset": {"confirm": "yes"},
        "/ui/policies/reload": {},
        "/ui/logout": {},
    }
    anonymous = browser(gateway.url)
    for path, fields in posts.items():
        for sender, token in ((client, None), (client, "0" * 64), (anonymous, None)):
            page = await sender.post(path, fields if token is None else {"csrf_token": token, **fields})
            assert page.status == 403, (path, page.status)
    assert await clean_database.fetch("SELECT * FROM api_keys ORDER BY key_id") == keys_before
    assert gateway.app[state.POLICIES].last_reload_at is None
    quotas_after = await client.get("/ui/quotas")
    assert quota_cell(quotas_after.text, "user", "dora", "per-user:tokens:minute", "used") == used_before
    # Still signed in: the logout without its token did nothing.
    assert quotas_after.status == 200
    # The login form's token too: without it, even the right key is refused.
    page = await anonymous.post("/ui/login", {"admin_key": ADMIN_KEY})
    assert page.status == 403
    assert not any(c.startswith("gw_console=") for c in page.set_cookies)


async def test_an_idle_session_ends(
    start_gateway: StartGateway,
    config_writer: ConfigWriter,
    clean_database: asyncpg.Connection,
    browser: NewBrowser,
) -> None:
    config_writer.extra = "console: {idle_timeout_seconds: 1, session_lifetime_seconds: 3600}\n"
    gateway = await start(start_gateway, "postgres")
    client = browser(gateway.url)
    await client.login()
    assert (await client.get("/ui/health")).status == 200
    await asyncio.sleep(1.3)
    page = await client.get("/ui/health")
    assert page.status == 303 and page.headers["Location"] == "/ui/login?next=/ui/health"
    # The ended session is gone from the table.
    assert await clean_database.fetchval("SELECT count(*) FROM console_sessions") == 0


async def test_a_session_ends_at_its_lifetime_whatever_the_activity(
    start_gateway: StartGateway,
    config_writer: ConfigWriter,
    clean_database: asyncpg.Connection,
    browser: NewBrowser,
) -> None:
    config_writer.extra = "console: {idle_timeout_seconds: 1, session_lifetime_seconds: 1}\n"
    gateway = await start(start_gateway, "postgres")
    client = browser(gateway.url)
    await client.login()
    await clean_database.execute(
        "UPDATE console_sessions SET expires_at = $1", datetime.now(UTC) - timedelta(seconds=1)
    )
    assert (await client.get("/ui/keys")).status == 303


async def test_logout_clears_the_cookie_and_the_old_session_is_refused(
    start_gateway: StartGateway, clean_database: asyncpg.Connection, browser: NewBrowser
) -> None:
    gateway = await start(start_gateway, "postgres")
    client = browser(gateway.url)
    page = await client.login()
    session_cookie = next(c for c in page.set_cookies if c.startswith("gw_console="))
    session_id = session_cookie.split(";")[0].split("=", 1)[1]
    page = await client.submit("/ui/", "/ui/logout")
    assert page.status == 303 and page.headers["Location"] == "/ui/login"
    assert page.set_cookies == [
        'gw_console=""; expires=Thu, 01 Jan 1970 00:00:00 GMT; HttpOnly; Max-Age=0; Path=/ui/; SameSite=Strict'
    ]
    assert await clean_database.fetchval("SELECT count(*) FROM console_sessions") == 0
    # The old cookie, sent again as it was (a copy kept elsewhere), opens nothing.
    async with aiohttp.ClientSession() as replay:
        async with replay.get(
            f"{gateway.url}/ui/keys", headers={"Cookie": f"gw_console={session_id}"}, allow_redirects=False
        ) as response:
            assert response.status == 303
            assert response.headers["Location"] == "/ui/login?next=/ui/keys"


# ---------------------------------------------------------------- keys, usage, quotas


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_key_made_in_the_console_works_and_its_request_shows_in_usage_and_quotas(
    backend: str,
    start_gateway: StartGateway,
    config_writer: ConfigWriter,
    clean_database: asyncpg.Connection,
    browser: NewBrowser,
) -> None:
    gateway = await start(start_gateway, backend, clock_ms=lambda: T0_MS)
    client = browser(gateway.url)
    await client.login()
    created = await client.submit(
        "/ui/keys", "/ui/keys", {"user": "carol", "team": "lab", "tags": "batch", "models": "gpt-4o-mini"}
    )
    assert created.status == 200
    key, key_id = key_from(created)
    assert key.startswith("gw-") and created.text.count(key) == 1
    # Shown once: the list and every later page hold the id, never the key.
    listed = await client.get("/ui/keys")
    assert key_id in listed.text and key not in listed.text
    assert 'data-key-id="' + key_id + '" data-state="active"' in listed.text

    quotas = await client.get("/ui/quotas")
    assert quota_cell(quotas.text, "user", "carol", "per-user:tokens:minute", "used") == "0"
    assert quota_cell(quotas.text, "team", "lab", "per-team:tokens:minute", "used") == "0"

    answer = await gateway.client(key=key).chat.completions.create(
        model="gpt-4o-mini", messages=HI, max_tokens=5
    )
    assert answer.usage is not None
    prompt, completion = answer.usage.prompt_tokens, answer.usage.completion_tokens
    await gateway.settle()
    cost = (prompt * 0.15 + completion * 0.6) / 1_000_000

    today = datetime.now(UTC).date()
    usage = await client.get(f"/ui/usage?by=key&since={today}&until={today + timedelta(days=1)}")
    row = f'data-name="{key_id}"'
    assert cell(usage.text, row, "requests") == "1"
    assert cell(usage.text, row, "prompt_tokens") == str(prompt)
    assert cell(usage.text, row, "completion_tokens") == str(completion)
    assert cell(usage.text, row, "cost_usd") == f"{cost:.6f}"
    filtered = await client.get(f"/ui/usage?by=model&team=lab&since={today}")
    assert cell(filtered.text, 'data-name="gpt-4o-mini"', "prompt_tokens") == str(prompt)
    assert cell(filtered.text, 'data-name="TOTAL"', "requests") == "1"
    csv = await client.get(f"/ui/usage.csv?by=key&key={key_id}&since={today}")
    assert csv.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert (
        csv.text
        == f"key,requests,prompt_tokens,completion_tokens,cost_usd\n{key_id},1,{prompt},{completion},{cost:.6f}\n"
    )

    overview = await client.get("/ui/")
    assert int(cell(overview.text, 'data-name="carol"', "prompt_tokens")) == prompt
    accuracy = re.search(r'<table id="accuracy-table">.*?</table>', overview.text, re.DOTALL)
    assert accuracy is not None
    assert cell(accuracy[0], 'data-name="gpt-4o-mini"', "billed") == str(prompt)

    quotas = await client.get("/ui/quotas")
    assert quota_cell(quotas.text, "user", "carol", "per-user:tokens:minute", "used") == str(
        prompt + completion
    )
    assert quota_cell(quotas.text, "user", "carol", "per-user:requests:minute", "used") == "1"
    assert quota_cell(quotas.text, "team", "lab", "per-team:tokens:minute", "used") == str(
        prompt + completion
    )
    assert quota_cell(quotas.text, "user", "carol", "per-user:tokens:minute", "remaining") == str(
        1_000_000 - prompt - completion
    )
    # The same figures as GET /v1/quota gives the key's caller.
    async with aiohttp.ClientSession() as plain:
        async with plain.get(
            f"{gateway.url}/v1/quota", headers={"Authorization": f"Bearer {key}"}
        ) as response:
            own = await response.json()
    tokens = next(
        limit for limit in own["limits"] if limit["policy"] == "per-user" and limit["kind"] == "tokens"
    )
    assert tokens["used"] == prompt + completion

    # Reset, after its confirmation page: every counter of carol back to 0.
    confirm = await client.get("/ui/quotas/user/carol/reset")
    assert 'id="confirm-reset"' in confirm.text
    unconfirmed = await client.post("/ui/quotas/user/carol/reset", {"csrf_token": confirm.csrf_token})
    assert unconfirmed.status == 200 and 'id="confirm-reset"' in unconfirmed.text
    assert (
        quota_cell((await client.get("/ui/quotas")).text, "user", "carol", "per-user:tokens:minute", "used")
        != "0"
    )
    done = await client.post(
        "/ui/quotas/user/carol/reset", {"csrf_token": confirm.csrf_token, "confirm": "yes"}
    )
    assert done.status == 303 and done.headers["Location"].startswith("/ui/quotas?reset=user+carol&deleted=")
    quotas = await client.get("/ui/quotas")
    assert quota_cell(quotas.text, "user", "carol", "per-user:tokens:minute", "used") == "0"
    assert quota_cell(quotas.text, "user", "carol", "per-user:requests:minute", "used") == "0"
    # The team's counter was not reset.
    assert quota_cell(quotas.text, "team", "lab", "per-team:tokens:minute", "used") == str(
        prompt + completion
    )


async def test_the_csv_download_equals_gateway_usage_csv(
    start_gateway: StartGateway,
    config_writer: ConfigWriter,
    clean_database: asyncpg.Connection,
    browser: NewBrowser,
) -> None:
    gateway = await start(start_gateway, "postgres")
    client = browser(gateway.url)
    await client.login()
    for user in ("erin", "frank"):
        key, _ = key_from(await client.submit("/ui/keys", "/ui/keys", {"user": user}))
        for tokens in (3, 7):
            await gateway.client(key=key).chat.completions.create(
                model="gpt-4o-mini", messages=HI, max_tokens=tokens
            )
    await gateway.client().chat.completions.create(model="gpt-4", messages=HI, max_tokens=2)
    await gateway.settle()
    since = datetime.now(UTC).date().replace(day=1)
    until = datetime.now(UTC).date() + timedelta(days=2)
    for by in ("key", "user", "team", "model", "day"):
        command = [sys.executable, "-m", "gateway", "usage", "--config", str(gateway.config.path), "--by", by]
        command += ["--since", since.isoformat(), "--until", until.isoformat(), "--format", "csv"]
        printed = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
        page = await client.get(f"/ui/usage.csv?by={by}&since={since}&until={until}")
        assert page.status == 200
        assert page.text == printed, by
        assert len(printed.splitlines()) > 1
        table = await client.get(f"/ui/usage?by={by}&since={since}&until={until}")
        for line in printed.splitlines()[1:]:
            name, requests, *_ = line.split(",")
            assert cell(table.text, f'data-name="{name}"', "requests") == requests


async def test_a_revoked_key_is_refused_at_once(
    start_gateway: StartGateway, clean_database: asyncpg.Connection, browser: NewBrowser
) -> None:
    gateway = await start(start_gateway, "embedded")
    client = browser(gateway.url)
    await client.login()
    key, key_id = key_from(await client.submit("/ui/keys", "/ui/keys", {"user": "gina"}))
    sdk = gateway.client(key=key)
    assert (await sdk.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=1)).choices
    page = await client.submit("/ui/keys", f"/ui/keys/{key_id}/revoke")
    assert page.status == 303 and page.headers["Location"] == f"/ui/keys?revoked={key_id}"
    listed = await client.get("/ui/keys")
    assert f'data-key-id="{key_id}" data-state="revoked"' in listed.text
    # Within the key cache's lifetime too: the console dropped its cached answer.
    with pytest.raises(openai.AuthenticationError):
        await sdk.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=1)
    again = await client.submit("/ui/keys", f"/ui/keys/{key_id}/revoke")
    assert again.status == 404


async def test_rotation_keeps_the_old_key_for_its_grace_and_the_new_one_works(
    start_gateway: StartGateway, clean_database: asyncpg.Connection, browser: NewBrowser
) -> None:
    gateway = await start(start_gateway, "postgres")
    client = browser(gateway.url)
    await client.login()
    old_key, old_id = key_from(
        await client.submit("/ui/keys", "/ui/keys", {"user": "hank", "team": "ops", "models": "gpt-4o-mini"})
    )
    old = gateway.client(key=old_key)
    assert (await old.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=1)).choices
    rotated = await client.submit("/ui/keys", f"/ui/keys/{old_id}/rotate", {"grace": "2s"})
    assert rotated.status == 200
    new_key, new_id = key_from(rotated)
    assert new_id != old_id and f"The old key {old_id} keeps working until" in rotated.text
    new = gateway.client(key=new_key)
    for sdk in (old, new):
        assert (await sdk.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=1)).choices
    # The successor has the same owner, team and models.
    stored = await clean_database.fetchrow(
        "SELECT user_id, team_id, models FROM api_keys WHERE key_id = $1", new_id
    )
    assert (stored["user_id"], stored["team_id"], list(stored["models"])) == ("hank", "ops", ["gpt-4o-mini"])
    await asyncio.sleep(2.2)
    with pytest.raises(openai.AuthenticationError) as expired:
        await old.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=1)
    assert expired.value.response.json()["error"]["code"] == "api_key_expired"
    assert (await new.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=1)).choices
    listed = await client.get("/ui/keys")
    assert f'data-key-id="{old_id}" data-state="expired"' in listed.text
    assert f'data-key-id="{new_id}" data-state="active"' in listed.text


async def test_a_malformed_key_request_is_refused_with_the_reason(
    start_gateway: StartGateway, clean_database: asyncpg.Connection, browser: NewBrowser
) -> None:
    gateway = await start(start_gateway, "postgres")
    client = browser(gateway.url)
    await client.login()
    for fields, reason in (
        ({"user": ""}, "user: is required"),
        ({"user": "bad name"}, "user: may use letters, digits and . _ @ + -"),
        ({"user": "ivy", "expires_in": "soon"}, "expires_in: a duration is a number and d, h, m or s"),
    ):
        page = await client.submit("/ui/keys", "/ui/keys", fields)
        assert page.status == 400 and reason in page.text.replace("&#39;", "'")
    assert await clean_database.fetchval("SELECT count(*) FROM api_keys") == 0


# ---------------------------------------------------------------- policies and health


async def test_reloading_policies_updates_the_last_reload(
    start_gateway: StartGateway,
    config_writer: ConfigWriter,
    clean_database: asyncpg.Connection,
    browser: NewBrowser,
) -> None:
    gateway = await start(start_gateway, "postgres")
    client = browser(gateway.url)
    await client.login()
    page = await client.get("/ui/policies")
    assert 'id="last-reload">none yet<' in page.text and 'id="active-policies">2<' in page.text
    (config_writer.directory / "policies" / "more.yaml").write_text(
        "policies:\n  - name: per-key\n    scope: key\n    limits:\n      - {requests: 5, per: second}\n"
    )
    done = await client.submit("/ui/policies", "/ui/policies/reload")
    assert done.status == 303 and done.headers["Location"] == "/ui/policies?reloaded=ok"
    page = await client.get("/ui/policies")
    holder = gateway.app[state.POLICIES]
    assert holder.last_reload_at is not None and holder.last_reload_ok
    stamp = holder.last_reload_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    assert f'id="last-reload">{stamp} — ok<' in page.text
    assert 'id="active-policies">3<' in page.text and 'data-name="per-key"' in page.text
    # A broken file: the reload fails, the three policies stay in force, the file says why.
    (config_writer.directory / "policies" / "more.yaml").write_text("policies:\n  - name: broken\n")
    done = await client.submit("/ui/policies", "/ui/policies/reload")
    assert done.headers["Location"] == "/ui/policies?reloaded=failed"
    page = await client.get("/ui/policies")
    assert "— failed<" in page.text and 'id="active-policies">3<' in page.text
    assert "more.yaml" in page.text and "scope" in page.text


async def test_the_health_page_shows_readiness_circuits_and_the_spool(
    start_gateway: StartGateway, clean_database: asyncpg.Connection, browser: NewBrowser
) -> None:
    gateway = await start(start_gateway, "postgres")
    client = browser(gateway.url)
    await client.login()
    page = await client.get("/ui/health")
    assert 'id="overall" class="state-healthy">healthy<' in page.text
    for component in ("redis", "database", "tokenizers", "spool", "upstreams"):
        assert f'data-name="{component}"' in page.text
    assert 'id="spool-pending" data-value="0"' in page.text
    assert re.search(
        r'data-name="fake"><th scope="row">fake</th><td class="circuit-closed">closed<', page.text
    )


# ---------------------------------------------------------------- where it is served


async def test_the_console_is_on_the_admin_listener_when_there_is_one(
    config_writer: ConfigWriter, clean_database: asyncpg.Connection, browser: NewBrowser
) -> None:
    admin_port = free_port()
    path = config_writer.write(POLICIES)
    text = path.read_text().replace("admin:\n", f"admin:\n  host: 127.0.0.1\n  port: {admin_port}\n", 1)
    path.write_text(text)
    server = TestServer(create_app(load_config(path)))
    await server.start_server()
    try:
        main = browser(str(server.make_url("")).rstrip("/"))
        assert (await main.get("/ui/login")).status == 404
        admin = browser(f"http://127.0.0.1:{admin_port}")
        assert (await admin.login()).status == 303
        assert (await admin.get("/ui/keys")).status == 200
        assert (await admin.get("/ui/health")).status == 200
    finally:
        await server.close()


async def test_no_console_without_the_admin_api(
    config_writer: ConfigWriter, clean_database: asyncpg.Connection, browser: NewBrowser
) -> None:
    path = config_writer.write(POLICIES)
    path.write_text(re.sub(r"admin:\n  key_sha256: \w+\n", "", path.read_text()))
    config = load_config(path)
    assert config.admin_key_sha256 is None
    server = TestServer(create_app(config))
    await server.start_server()
    try:
        client = browser(str(server.make_url("")).rstrip("/"))
        assert (await client.get("/ui/login")).status == 404
    finally:
        await server.close()


async def test_the_shipped_config_serves_the_console(tmp_path: Path, browser: NewBrowser) -> None:
    """The embedded default as shipped: SQLite ledger, embedded quota store, the README's admin key."""
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "gateway.yaml").write_text((root / "gateway.yaml").read_text())
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "default.yaml").write_text((root / "policies" / "default.yaml").read_text())
    server = TestServer(create_app(load_config(tmp_path / "gateway.yaml")))
    await server.start_server()
    try:
        base = str(server.make_url("")).rstrip("/")
        client = browser(base)
        assert (await client.login("gw-admin-key-change-me")).status == 303
        sdk = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="gw-demo-key-change-me", max_retries=0)
        try:
            answer = await sdk.chat.completions.create(model="gpt-4o-mini", messages=HI)
        finally:
            await sdk.close()
        assert answer.usage is not None
        await server.app[state.SETTLEMENT].drain()
        await server.app[state.LEDGER].flush()
        for path in PAGES:
            assert (await client.get(path)).status == 200, path
        quotas = await client.get("/ui/quotas")
        used = int(quota_cell(quotas.text, "user", "demo", "per-user:tokens:minute", "used"))
        assert used == answer.usage.total_tokens
        usage = await client.get("/ui/usage?by=key")
        assert cell(usage.text, 'data-name="demo"', "prompt_tokens") == str(answer.usage.prompt_tokens)
    finally:
        await server.close()


async def test_the_overview_counts_outcomes_errors_and_rejections_exactly(
    start_gateway: StartGateway,
    fake_upstream: FakeUpstream,
    clean_database: asyncpg.Connection,
    browser: NewBrowser,
) -> None:
    tight = "policies:\n  - name: tight\n    scope: user\n    limits:\n      - {requests: 2, per: minute}\n"
    gateway = await start_gateway(tight, clock_ms=lambda: T0_MS)
    client = browser(gateway.url)
    await client.login()
    sdk = gateway.client()
    answer = await sdk.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=5)
    assert answer.usage is not None
    fake_upstream.mode = "error_500"
    with pytest.raises(openai.APIStatusError) as failed:
        await sdk.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=5)
    with pytest.raises(openai.RateLimitError):
        await sdk.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=5)
    await gateway.settle()
    status, code = failed.value.status_code, failed.value.response.json()["error"]["code"]
    assert status >= 500
    assert await clean_database.fetchval("SELECT count(*) FROM usage_events") == 2

    page = (await client.get("/ui/")).text
    assert 'id="today-requests" data-value="2"' in page
    assert f'id="today-tokens" data-value="{answer.usage.total_tokens}"' in page
    assert 'id="events-requests" data-value="2"' in page
    assert 'id="events-errors" data-value="1"' in page
    assert 'id="events-error-rate">50.0%<' in page
    assert re.search(
        rf'<tr data-name="{status} {code}"><td>{status}</td><td>{code}</td><td class="num">1<', page
    )
    assert cell(page, 'data-name="429"', "requests") == "1"
    assert cell(page, 'data-name="user requests_per_minute"', "requests") == "1"
    accuracy = re.search(r'<table id="accuracy-table">.*?</table>', page, re.DOTALL)
    assert accuracy is not None
    # Only the answered request was billed: the failed one has no provider usage.
    assert cell(accuracy[0], 'data-name="gpt-4o-mini"', "billed") == str(answer.usage.prompt_tokens)
