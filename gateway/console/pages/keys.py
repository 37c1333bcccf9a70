"""Keys: every key with its owner, team, models, expiry and state; create, revoke, rotate.

Created and rotated keys are made by gateway/keys.py, as `gateway keys create|rotate`
makes them. A key revoked or rotated here is dropped from this process's key cache at
once; other worker processes notice within the cache's 10 seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web

from gateway import state
from gateway.auth import KeyRecord
from gateway.console.render import page, redirect
from gateway.console.state import GATEWAY
from gateway.keys import KeyRequestError, find_key_record, new_key, parse_duration, rotate_key

DEFAULT_GRACE = "24h"


@dataclass(frozen=True)
class KeyRow:
    key_id: str
    user: str
    team: str | None
    tags: tuple[str, ...]
    models: tuple[str, ...]
    created_at: datetime | None
    expires_at: datetime | None
    state: str
    # "database" (made by the CLI or the console) or "gateway.yaml" (static: edit the file).
    source: str

    @property
    def changeable(self) -> bool:
        return self.source == "database" and self.state not in ("revoked", "expired")


def key_state(revoked_at: datetime | None, expires_at: datetime | None, now: datetime) -> str:
    if revoked_at is not None:
        return "revoked"
    if expires_at is not None and expires_at <= now:
        return "expired"
    return "expiring" if expires_at is not None else "active"


def _rows(records: list[KeyRecord], request: web.Request) -> list[KeyRow]:
    now = datetime.now(UTC)
    rows = [
        KeyRow(
            key.id,
            key.user,
            key.team,
            key.tags,
            key.models,
            None,
            key.expires_at,
            key_state(None, key.expires_at, now),
            "gateway.yaml",
        )
        for key in request.app[GATEWAY][state.CONFIG].keys
    ]
    rows.extend(
        KeyRow(
            record.key_id,
            record.user,
            record.team,
            record.tags,
            record.models,
            record.created_at,
            record.expires_at,
            key_state(record.revoked_at, record.expires_at, now),
            "database",
        )
        for record in records
    )
    return rows


async def keys(request: web.Request) -> web.StreamResponse:
    return await _keys_page(request, {}, None, 200)


async def _keys_page(
    request: web.Request, form: dict[str, str], problem: str | None, status: int
) -> web.StreamResponse:
    records = await request.app[GATEWAY][state.STORE].list_keys()
    return page(
        request,
        "keys.html",
        {
            "title": "Keys",
            "page": "keys",
            "rows": _rows(records, request),
            "form": form,
            "problem": problem,
            "revoked": request.query.get("revoked"),
            "default_grace": DEFAULT_GRACE,
            "models": sorted(request.app[GATEWAY][state.CONFIG].models),
        },
        status=status,
    )


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.replace("\n", ",").split(",") if name.strip()]


async def create(request: web.Request) -> web.StreamResponse:
    posted = await request.post()
    form = {
        name: str(posted.get(name, "")).strip() for name in ("user", "team", "tags", "models", "expires_in")
    }
    models = [str(model) for model in posted.getall("model", [])] + _names(form["models"])
    try:
        if not form["user"]:
            raise KeyRequestError("user", "is required")
        expires_in = parse_duration(form["expires_in"], "expires_in") if form["expires_in"] else None
        issued = new_key(form["user"], form["team"] or None, _names(form["tags"]), models, expires_in)
    except KeyRequestError as exc:
        return await _keys_page(request, form, f"{exc.field}: {exc.message}", 400)
    await request.app[GATEWAY][state.STORE].insert_key(issued.record)
    # Answered here, never by a redirect: the key must not sit in a URL or a later page.
    return page(
        request,
        "key_issued.html",
        {
            "title": "Key created",
            "page": "keys",
            "key": issued.key,
            "record": issued.record,
            "rotation": None,
        },
    )


async def revoke(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    key_id = request.match_info["key_id"]
    record = await find_key_record(gateway[state.STORE], key_id)
    if record is None or not await gateway[state.STORE].revoke_key(key_id):
        raise web.HTTPNotFound(reason=f"No active key with id {key_id}.")
    gateway[state.AUTH].forget(record.sha256)
    return redirect(f"/ui/keys?revoked={key_id}")


async def rotate(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    key_id = request.match_info["key_id"]
    posted = await request.post()
    grace_text = str(posted.get("grace", DEFAULT_GRACE)).strip() or DEFAULT_GRACE
    try:
        grace = parse_duration(grace_text, "grace")
    except KeyRequestError as exc:
        return await _keys_page(request, {}, f"{exc.field}: {exc.message}", 400)
    old = await find_key_record(gateway[state.STORE], key_id)
    rotation = await rotate_key(gateway[state.STORE], key_id, grace)
    if rotation is None or old is None:
        raise web.HTTPNotFound(reason=f"No active key with id {key_id}.")
    # The old key's cached answer knew no expiry: the next use reads the new one.
    gateway[state.AUTH].forget(old.sha256)
    return page(
        request,
        "key_issued.html",
        {
            "title": "Key rotated",
            "page": "keys",
            "key": rotation.successor.key,
            "record": rotation.successor.record,
            "rotation": rotation,
        },
    )
