"""The canned upstream: an nginx instance of our own (prefix, config, pid, logs in a temp folder).

Each scenario has its own location, /{plain|stream}/{size}/v1/chat/completions, that
answers a POST with a fixed chat.completion (JSON) or a fixed SSE stream whose usage
matches the scenario's prompt, so the gateway settles exactly what it reserved.
`return` makes nginx discard the request body and keep the connection alive.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from bench.http import workload
from bench.http.processes import Process, start

TEMPLATE = Path(__file__).with_name("nginx.conf.template")
LOCATION = """\
        location = __PATH__/chat/completions {
            default_type __TYPE__;
            return 200 '__BODY__';
        }
"""


def _nginx_string(text: str) -> str:
    """`text` inside an nginx single-quoted string, newlines as \\n escapes."""
    if "'" in text or "\\" in text:
        raise ValueError("canned bodies must not hold quotes or backslashes")
    return text.replace("\n", "\\n")


def render_config(prefix: Path, port: int) -> str:
    locations = []
    for size in workload.PROMPT_SIZES:
        for mode, content_type, body in (
            ("plain", "application/json", workload.canned_completion(size)),
            ("stream", "text/event-stream", workload.canned_stream(size)),
        ):
            location = LOCATION.replace("__PATH__", f"/{mode}/{size}/v1")
            location = location.replace("__TYPE__", content_type)
            locations.append(location.replace("__BODY__", _nginx_string(body)))
    text = TEMPLATE.read_text().replace("__LOCATIONS__", "\n".join(locations))
    return text.replace("__PREFIX__", str(prefix)).replace("__PORT__", str(port))


def nginx_binary() -> str:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and Path(candidate).exists():
            return candidate
    raise RuntimeError("nginx is not installed (./scripts/bench installs Debian's nginx package)")


def start_nginx(folder: Path, port: int, cpus: str | None) -> Process:
    """nginx in the foreground (`daemon off`), one worker, its files under `folder`."""
    for sub in ("logs", "temp"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    config = folder / "nginx.conf"
    config.write_text(render_config(folder, port))
    command = [nginx_binary(), "-p", str(folder), "-c", str(config), "-e", str(folder / "logs" / "error.log")]
    check = subprocess.run([*command, "-t"], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"nginx rejects its config {config}:\n{check.stderr}")
    return start("nginx", command, cwd=folder, log=folder / "logs" / "stderr.log", cpus=cpus, port=port)
