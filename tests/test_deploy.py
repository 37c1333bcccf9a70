"""The deployment files: valid rules, probes in place, and only metrics that exist."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
METRIC = re.compile(r"\bgateway_[a-z_]+\b")
SUFFIXES = ("_bucket", "_count", "_sum")


def exported_metrics() -> set[str]:
    catalogue = (REPO / "docs" / "metrics.md").read_text()
    return set(re.findall(r"^\| `(gateway_[a-z_]+)`", catalogue, re.MULTILINE))


def used_metrics(text: str) -> set[str]:
    names = set()
    for name in METRIC.findall(text):
        for suffix in SUFFIXES:
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        names.add(name)
    return names


def test_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: scripts/test installs Debian's prometheus package for it")
    result = subprocess.run(
        [promtool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


def test_rules_and_dashboard_use_only_exported_metrics() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    expressions = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    dashboard = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    expressions += [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = used_metrics("\n".join(expressions))
    assert len(used) >= 10
    assert used <= exported_metrics(), f"unknown metrics: {sorted(used - exported_metrics())}"


def test_kubernetes_manifests_probe_the_health_endpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kinds = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        document = yaml.safe_load(path.read_text())
        kinds[document["kind"]] = document
    assert set(kinds) == {"ConfigMap", "Secret", "Deployment", "Service", "HorizontalPodAutoscaler"}
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert kinds["Deployment"]["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    # The config in the ConfigMap is a valid gateway.yaml once its variables are set.
    from gateway.config import load_config

    config_file = tmp_path / "gateway.yaml"
    config_file.write_text(kinds["ConfigMap"]["data"]["gateway.yaml"])
    monkeypatch.setenv("REDIS_URL", "redis://redis:6379/0")
    monkeypatch.setenv("DATABASE_URL", "postgresql://gateway@postgres/gateway")
    assert "gpt-4o-mini" in load_config(config_file).models


def test_compose_and_dockerfile() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"gateway", "redis", "postgres", "prometheus", "grafana"}
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "\nUSER gateway\n" in dockerfile
    assert "HEALTHCHECK" in dockerfile
    assert "gateway tokenizers fetch" in dockerfile  # tokenizer files fetched at build time


def _run_dockerfile_fetch(tmp_path: Path, **build_args: str) -> subprocess.CompletedProcess[str]:
    """The Dockerfile's tokenizer fetch, run by sh as a RUN line is, with these build
    arguments, the cache in tmp_path/tokenizers and never the network."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.startswith("RUN gateway tokenizers fetch")]
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "TIKTOKEN_CACHE_DIR": str(tmp_path / "tokenizers"),
        # A proxy on a closed port: nothing is downloaded.
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        **build_args,
    }
    return subprocess.run(
        ["sh", "-c", line.removeprefix("RUN ")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )


@pytest.mark.parametrize(
    ("encodings", "fetched"),
    [
        ("", ["cl100k_base: fetched: ", "o200k_base: fetched: "]),
        ("o200k_harmony", ["cl100k_base: fetched: ", "o200k_base, o200k_harmony: fetched: "]),
    ],
)
def test_the_image_fetches_the_encodings_its_build_names(
    tmp_path: Path, encodings: str, fetched: list[str]
) -> None:
    """From a folder of the files (TOKENIZERS_FROM) into the image's cache, with
    TOKENIZER_ENCODINGS as given."""
    shared = Path(os.environ["TIKTOKEN_CACHE_DIR"])
    run = _run_dockerfile_fetch(tmp_path, TOKENIZERS_FROM=str(shared), TOKENIZER_ENCODINGS=encodings)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert [line[: len(start)] for line, start in zip(lines[1:3], fetched, strict=True)] == fetched
    assert sorted(path.name for path in (tmp_path / "tokenizers").iterdir()) == sorted(
        path.name for path in shared.iterdir() if path.is_file() and len(path.name) == 40
    )


def test_an_encoding_the_gateway_does_not_know_fails_the_build(tmp_path: Path) -> None:
    run = _run_dockerfile_fetch(tmp_path, TOKENIZER_ENCODINGS="p50k")
    assert run.returncode == 2
    assert "argument --encoding: invalid choice: 'p50k'" in run.stderr
    assert not (tmp_path / "tokenizers").exists()
