"""The console's shipped files: the vendored chart library matches its pins, every
template and static file is package data, and no template holds inline script or style."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSOLE = ROOT / "gateway" / "console"


def test_the_vendored_chart_library_matches_its_pins() -> None:
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "vendor-chart"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok: uplot 1.6.32 (MIT) in gateway/console/static/vendor matches its pins"


def test_every_console_file_is_package_data() -> None:
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "gateway"
    ]
    for path in [*CONSOLE.joinpath("templates").rglob("*"), *CONSOLE.joinpath("static").rglob("*")]:
        if path.is_file():
            relative = path.relative_to(ROOT / "gateway").as_posix()
            assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative


def test_templates_hold_no_inline_script_style_or_handler() -> None:
    for template in CONSOLE.joinpath("templates").glob("*.html"):
        text = template.read_text()
        for script in re.findall(r"<script[^>]*>", text):
            assert 'src="/ui/static/' in script or 'type="application/json"' in script, (
                template.name,
                script,
            )
        assert "<style" not in text and "style=" not in text, template.name
        assert not re.search(r"\son[a-z]+\s*=", text), template.name
        assert "javascript:" not in text, template.name
