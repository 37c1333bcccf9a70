"""One structured line per request; no key, no prompt, no provider secret in any log."""

from __future__ import annotations

import enum
import io
import json
import logging
from pathlib import Path
from typing import Any

import asyncpg
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.logs import REQUEST_LOGGER, JsonFormatter, JsonLinesHandler, encode_line
from tests.conftest import PROVIDER_KEY, USER_KEY, ConfigWriter, StartGateway

SECRET_PROMPT = "the launch code is 0000-tango-secret"


def request_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [json.loads(JsonFormatter().format(r)) for r in caplog.records if r.name == REQUEST_LOGGER]


async def test_each_request_logs_one_structured_line(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture, pg: asyncpg.Connection
) -> None:
    caplog.set_level(logging.DEBUG)
    gateway = await start_gateway()
    client = gateway.client()
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": SECRET_PROMPT}], max_tokens=3
    )
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        await gateway.client(key="gw-wrong-key").chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
    await gateway.settle()
    ok, missing, unauthorised = request_lines(caplog)
    assert ok["request_id"] == raw.headers["x-gateway-request-id"]
    assert (ok["status"], ok["route"], ok["model"], ok["key_id"], ok["user"], ok["team"]) == (
        200,
        "/v1/chat/completions",
        "gpt-4o-mini",
        "alice-key",
        "alice",
        "research",
    )
    assert (
        ok["provider"],
        ok["attempts"],
        ok["prompt_tokens"],
        ok["completion_tokens"],
        ok["usage_source"],
    ) == (
        "fake",
        1,
        17,  # 3 + 3 + "user" 1 + the secret sentence 10
        3,
        "provider",
    )
    assert isinstance(ok["latency_ms"], float) and isinstance(ok["upstream_latency_ms"], float)
    assert "prompt" not in ok
    assert (missing["status"], missing["error_code"], missing["key_id"]) == (
        404,
        "model_not_found",
        "alice-key",
    )
    assert (unauthorised["status"], unauthorised["error_code"], unauthorised["key_id"]) == (
        401,
        "invalid_api_key",
        None,
    )
    everything = "\n".join(JsonFormatter().format(record) for record in caplog.records)
    for secret in (SECRET_PROMPT, USER_KEY, "gw-wrong-key", PROVIDER_KEY):
        assert secret not in everything


async def test_prompts_are_logged_only_when_asked(
    start_gateway: StartGateway,
    config_writer: ConfigWriter,
    caplog: pytest.LogCaptureFixture,
    pg: asyncpg.Connection,
) -> None:
    caplog.set_level(logging.INFO)
    config_writer.extra = "server: {log_prompts: true}\n"
    gateway = await start_gateway()
    await gateway.client().chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": SECRET_PROMPT}], max_tokens=1
    )
    (line,) = request_lines(caplog)
    assert SECRET_PROMPT in str(line["prompt"])
    assert USER_KEY not in json.dumps(line)


def test_the_direct_request_line_is_the_formatter_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import re
    import sys
    import threading
    import warnings

    from gateway.logs import JsonLinesHandler, log_request, setup_logging

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    # setup_logging also routes Python's own reports (warnings, uncaught exceptions) to
    # logging: all put back after.
    for owner, hook in ((sys, "excepthook"), (sys, "unraisablehook"), (threading, "excepthook")):
        monkeypatch.setattr(owner, hook, getattr(owner, hook))
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.setattr(logging, "_warnings_showwarning", None)
    setup_logging("info", True)
    (handler,) = root.handlers
    assert isinstance(handler, JsonLinesHandler)
    written = io.StringIO()
    handler.setStream(written)
    fields = {"request_id": "r-1", "status": 200, "latency_ms": 1.5, "user": "żaba", "key_id": None}

    def no_record(*args: object, **kwargs: object) -> logging.LogRecord:
        raise AssertionError("the request line went through a LogRecord")

    monkeypatch.setattr(logging.Logger, "makeRecord", no_record)
    log_request(fields)
    direct = written.getvalue()
    # The second line begins with the text the first made of its level, logger and message.
    log_request(fields)
    first, second = written.getvalue().splitlines()
    time_field = r'"time":"[^"]*"'
    assert re.sub(time_field, "", second) == re.sub(time_field, "", first)
    written.truncate(0)
    written.seek(0)
    log_request(fields)
    direct = written.getvalue()
    # The same line through a LogRecord and the formatter, as any other handler would get it.
    record = logging.LogRecord(REQUEST_LOGGER, logging.INFO, __file__, 1, "request", None, None)
    record.fields = fields
    through_logging = JsonFormatter().format(record) + "\n"
    time_pattern = r'"time":"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00"'
    assert re.match("^{" + time_pattern, direct) and re.match("^{" + time_pattern, through_logging)
    assert re.sub(time_pattern, "", direct) == re.sub(time_pattern, "", through_logging)
    assert direct.count("\n") == 1 and '"user":"żaba"' in direct
    # A level above info silences request lines on the direct path too.
    root.setLevel("WARNING")
    log_request(fields)
    assert written.getvalue() == direct


class Level(enum.IntEnum):
    HIGH = 3


# JSON's own values: no NaN or infinity (written as null), integers of any size (past 64
# bits orjson refuses them and the fallback writes them), text with lone surrogates.
finite_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=8), finite_json_values, max_size=8))
def test_a_line_reads_back_as_the_fields_it_was_made_of(line: dict[str, Any]) -> None:
    text = encode_line(line)
    assert "\n" not in text
    assert json.loads(text) == line


def test_a_line_writes_what_json_has_no_form_for_as_text_or_null() -> None:
    line: dict[Any, Any] = {
        "status": 200,
        7: "seven",
        None: 1,
        "level": Level.HIGH,
        "raw": b"x",
        "pair": ("t", 1),
        "nan": float("nan"),
        "inf": -float("inf"),
    }
    assert encode_line(line) == (
        '{"status":200,"7":"seven","null":1,"level":3,"raw":"b\'x\'","pair":["t",1],"nan":null,"inf":null}'
    )


def test_a_line_with_a_lone_surrogate_is_written_in_ascii_and_reads_back() -> None:
    # A caller's JSON may escape half a surrogate pair; orjson refuses it, the fallback writes it.
    line = {"client_request_id": "a\ud800b", "user": "żaba", "latency_ms": float("nan")}
    text = encode_line(line)
    assert text == '{"client_request_id":"a\\ud800b","user":"\\u017caba","latency_ms":null}'
    assert json.loads(text) == {"client_request_id": "a\ud800b", "user": "żaba", "latency_ms": None}


async def test_the_answer_is_sent_before_the_request_is_logged(
    start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counting and logging a request overlap the client reading its answer."""
    import asyncio
    import time

    from gateway import middlewares

    gateway = await start_gateway()
    logged: list[tuple[float, float]] = []
    log_request = middlewares.log_request

    def slow_log(fields: dict[str, object]) -> None:
        began = time.monotonic()
        time.sleep(0.3)  # holds the event loop: nothing else the gateway does can run
        logged.append((began, time.monotonic()))
        log_request(fields)

    monkeypatch.setattr(middlewares, "log_request", slow_log)

    def ask() -> float:
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=USER_KEY, max_retries=0)
        try:
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
            return time.monotonic()
        finally:
            client.close()

    answered_at = await asyncio.to_thread(ask)
    ((began, ended),) = logged
    # The log call holds the loop for 0.3 s: had the answer waited for it, the client
    # could not have had it before the call ended. (It may even have had it before the
    # call began, on a machine slow enough between sending and logging.)
    assert answered_at < ended
    assert ended - began >= 0.3


def test_a_request_line_to_a_file_goes_as_bytes_after_the_text_before_it(tmp_path: Path) -> None:
    """Written to the file's descriptor directly, after what went through the text layer."""
    handler = JsonLinesHandler()
    path = tmp_path / "gateway.log"
    text = io.StringIO()
    with open(path, "w", encoding="utf-8") as stream:
        handler.setStream(stream)
        stream.write("before\n")  # buffered in the text layer
        handler.write_line("info", REQUEST_LOGGER, "request", {"user": "żaba", "error_detail": "x" * 70_000})
        stream.write("after\n")
        # Any other stream (here a StringIO, as in tests) is written as text.
        handler.setStream(text)
    before, line, after = path.read_text(encoding="utf-8").splitlines()
    assert (before, after) == ("before", "after")
    fields = json.loads(line)
    assert fields["user"] == "żaba" and len(fields["error_detail"]) == 70_000
    handler.write_line("info", REQUEST_LOGGER, "request", {"status": 200})
    assert json.loads(text.getvalue())["status"] == 200 and text.getvalue().endswith("}\n")
