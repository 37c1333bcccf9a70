"""Every command of the README's quick start and client sections works as written.

The shipped gateway.yaml is started as scripts/serve starts it, in a copy of the
project folder, on a free port (GATEWAY_PORT, as the config reads it). Each shell
command of those sections is then run from that folder exactly as printed, with only
the port in its URLs changed, and so is each Python snippet. Commands must exit 0; curl
answers must be HTTP 200 (the README's `--fail-with-body` turns any other status into a
failed command) with the body the route promises.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.config import load_config
from tests.quickstart import REPO, ShippedGateway, project_copy, shipped_gateway

README = REPO / "README.md"
SECTIONS = ("Quick start", "Point a client at it")
README_ADDRESS = "127.0.0.1:8080"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.DOTALL | re.MULTILINE)
URL = re.compile(r"http://127\.0\.0\.1:\d+(/[^\s'\"]*)")
MODEL = re.compile(r"""["']?model["']?\s*[:=]\s*["']([^"']+)["']""")


def readme_blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block in SECTIONS, in README order."""
    text = README.read_text()
    blocks: list[tuple[str, str]] = []
    for section in re.split(r"^## ", text, flags=re.MULTILINE)[1:]:
        if section.splitlines()[0].strip() in SECTIONS:
            blocks += [(match[1], match[2]) for match in FENCE.finditer(section)]
    return blocks


def shell_commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comment lines dropped."""
    joined = re.sub(r"\\\n\s*", "", block)
    return [
        line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]


def is_run_here(command: str) -> bool:
    """scripts/serve and scripts/test are what the test itself stands for; the gateway
    they start is already running."""
    return not command.startswith("./scripts/") and "gateway serve" not in command


def readme_commands() -> list[str]:
    return [
        command
        for language, block in readme_blocks()
        if language == "sh"
        for command in shell_commands(block)
        if is_run_here(command)
    ]


def readme_snippets() -> list[str]:
    return [block for language, block in readme_blocks() if language == "python"]


def at_port(text: str, port: int) -> str:
    return text.replace(README_ADDRESS, f"127.0.0.1:{port}")


def run(command: list[str], gateway: ShippedGateway) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        command, cwd=gateway.folder, env=gateway.env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, (command, result.stdout, result.stderr, gateway.log)
    return result


def sse_events(body: str) -> list[str]:
    return [block for block in body.split("\n\n") if block.strip()]


def whole_json(body: str) -> dict[str, Any]:
    parsed = json.loads(body)
    assert isinstance(parsed, dict)
    return parsed


# What each route answers, whole or streamed: (method, path, streamed) → a check of the body.
Check = Callable[[str], bool]
ANSWERS: dict[tuple[str, str, bool], Check] = {
    ("POST", "/v1/chat/completions", False): lambda b: whole_json(b)["object"] == "chat.completion",
    ("POST", "/v1/chat/completions", True): lambda b: (
        sse_events(b)[-1] == "data: [DONE]"
        and json.loads(sse_events(b)[0].removeprefix("data: "))["object"] == "chat.completion.chunk"
    ),
    ("POST", "/v1/completions", False): lambda b: whole_json(b)["object"] == "text_completion",
    ("POST", "/v1/responses", False): lambda b: (
        whole_json(b)["object"] == "response" and whole_json(b)["usage"]["total_tokens"] > 0
    ),
    ("POST", "/v1/responses", True): lambda b: (
        sse_events(b)[0].startswith("event: response.created\n")
        and sse_events(b)[-1].startswith("event: response.completed\n")
    ),
    ("POST", "/v1/embeddings", False): lambda b: (
        whole_json(b)["object"] == "list" and {d["object"] for d in whole_json(b)["data"]} == {"embedding"}
    ),
    ("POST", "/v1/messages", False): lambda b: (
        whole_json(b)["type"] == "message" and whole_json(b)["usage"]["output_tokens"] > 0
    ),
    ("POST", "/v1/tokens/count", False): lambda b: whole_json(b)["object"] == "token_count",
    ("GET", "/v1/models", False): lambda b: whole_json(b)["object"] == "list",
    ("GET", "/v1/quota", False): lambda b: whole_json(b)["object"] == "quota",
    ("GET", "/admin/usage", False): lambda b: whole_json(b)["object"] == "usage.report",
    ("GET", "/admin/quota/user/demo", False): lambda b: whole_json(b)["object"] == "quota",
    ("DELETE", "/admin/quota/user/demo", False): lambda b: whole_json(b)["object"] == "quota.reset",
}


def route_of(command: str) -> tuple[str, str, bool]:
    url = URL.search(command)
    assert url is not None, command
    method = "DELETE" if "-X DELETE" in command else "POST" if " -d " in command else "GET"
    return method, url[1], '"stream": true' in command


def test_every_quick_start_command_and_snippet_works_as_written(tmp_path: Path) -> None:
    commands, snippets = readme_commands(), readme_snippets()
    for command in commands:
        assert command.startswith("curl ") or ".venv/bin/gateway " in command, (
            f"a README command this test does not know how to check: {command}"
        )
        assert not command.startswith("curl ") or README_ADDRESS in command, command
    assert len(snippets) == 2  # OpenAI's SDK, Anthropic's SDK

    routes: list[tuple[str, str, bool]] = []
    with shipped_gateway(project_copy(tmp_path)) as gateway:
        for command in commands:
            result = run(["bash", "-o", "pipefail", "-c", at_port(command, gateway.port)], gateway)
            assert result.stdout.strip(), command
            if command.startswith("curl "):
                route = route_of(command)
                assert route in ANSWERS, f"no expected answer for {route}: {command}"
                assert ANSWERS[route](result.stdout), (command, result.stdout)
                routes.append(route)
        for snippet in snippets:
            assert README_ADDRESS in snippet
            result = run([sys.executable, "-c", at_port(snippet, gateway.port)], gateway)
            assert result.stdout.strip(), snippet

    # The README shows every route the issue asks for, and every model the config ships.
    assert set(routes) >= {
        ("POST", "/v1/chat/completions", True),
        ("POST", "/v1/completions", False),
        ("POST", "/v1/responses", False),
        ("POST", "/v1/responses", True),
        ("POST", "/v1/embeddings", False),
        ("POST", "/v1/messages", False),
        ("GET", "/v1/quota", False),
        ("GET", "/admin/usage", False),
    }
    shown_models = {model for text in commands + snippets for model in MODEL.findall(text)}
    assert set(load_config(REPO / "gateway.yaml").models) <= shown_models


def test_the_readme_finds_the_commands_it_should() -> None:
    """The parsing above, on what it must and must not pick up (so a reformatted README
    cannot make the main test pass by running nothing)."""
    commands = readme_commands()
    assert not any(command.startswith("./scripts/") for command in commands)
    assert sum(command.startswith("curl ") for command in commands) >= 14
    assert sum(command.startswith(".venv/bin/gateway ") for command in commands) >= 4
    assert all("\\" not in command.replace("\\n", "") for command in commands)
    assert shell_commands("# a comment\ncurl a \\\n  -d 'b'\n\n.venv/bin/gateway check\n") == [
        "curl a -d 'b'",
        ".venv/bin/gateway check",
    ]
