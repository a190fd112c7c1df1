"""Checks on the deployment files in deploy/: they parse, name the right things,
and nginx itself accepts nginx.conf (installed on demand with apt-get)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"

METRICS = [
    "dsgw_appends_total",
    "dsgw_append_bytes_total",
    "dsgw_duplicate_appends_total",
    "dsgw_live_readers",
    "dsgw_responses_total",
    "dsgw_fanout_delivery_seconds",
    "dsgw_redis_call_seconds",
    "dsgw_sink_rows_total",
    "dsgw_sink_lag_seconds",
    "dsgw_sink_pending_entries",
    "dsgw_sink_rejected_total",
    "dsgw_source_changes_total",
    "dsgw_source_lag_seconds",
    "dsgw_source_skipped_total",
]
HISTOGRAMS = [
    "dsgw_fanout_delivery_seconds",
    "dsgw_redis_call_seconds",
    "dsgw_sink_lag_seconds",
    "dsgw_source_lag_seconds",
]


# --- helpers -------------------------------------------------------------------


def ensure_nginx() -> str:
    """Path of an nginx binary; installs Debian's nginx-light with apt-get when
    there is none (the tests run as root on Debian). Never skips."""

    def find() -> str | None:
        found = shutil.which("nginx")
        if found:
            return found
        for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
            if os.access(candidate, os.X_OK):
                return candidate
        return None

    found = find()
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "nginx-light"]
    attempts: list[subprocess.CompletedProcess[str]] = []
    for step in ([install], [["apt-get", "update"], install]):
        ok = True
        for cmd in step:
            result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            attempts.append(result)
            if result.returncode != 0:
                ok = False
                break
        if ok and find():
            break
    found = find()
    if not found:
        log = "\n".join(
            f"$ {' '.join(r.args)} -> {r.returncode}\n{r.stdout[-2000:]}{r.stderr[-2000:]}" for r in attempts
        )
        pytest.fail(f"nginx is not installed and apt-get could not install nginx-light:\n{log}")
    return found


def load_yaml_docs(path: Path) -> list[Any]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def active_lines(path: Path) -> list[str]:
    """Lines of a config file without comments and blank lines."""
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def host_port(entry: Any) -> str | None:
    """The host side of a compose `ports` entry, None when only a container port is given."""
    if isinstance(entry, dict):
        published = entry.get("published")
        return None if published in (None, "") else str(published)
    spec = str(entry).split("/", 1)[0]
    parts = spec.rsplit(":", 2)
    if len(parts) == 1:
        return None
    return parts[-2]


# --- YAML in general ---------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


def test_deploy_has_yaml_files() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in yaml_files()}
    assert "docker-compose.yml" in names
    assert any(name.startswith("k8s/") for name in names), names


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_yaml_file_parses(path: Path) -> None:
    docs = load_yaml_docs(path)
    assert docs, f"{path} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"


# --- docker compose ----------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    (doc,) = load_yaml_docs(DEPLOY / "docker-compose.yml")
    return doc


def test_compose_has_all_services(compose: dict[str, Any]) -> None:
    assert {"redis", "postgres", "gateway", "nginx", "sink", "source"} <= set(compose["services"])


def test_compose_gateway_scales(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    fixed = [p for p in gateway.get("ports", []) if host_port(p) is not None]
    assert not fixed, f"gateway publishes fixed host ports {fixed}; --scale gateway=3 would fail"
    assert "container_name" not in gateway
    assert gateway["deploy"]["replicas"] == 3
    assert gateway["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / gateway["build"]["context"] / gateway["build"]["dockerfile"]).resolve().is_file()
    assert gateway["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert "/readyz" in json.dumps(gateway["healthcheck"]["test"])


def test_compose_nginx_publishes_8080_with_upstreams_next_to_conf(compose: dict[str, Any]) -> None:
    nginx = compose["services"]["nginx"]
    assert any(host_port(p) == "8080" and str(p).rsplit(":", 1)[-1] == "8080" for p in nginx["ports"]), nginx[
        "ports"
    ]
    mounts = {}
    for volume in nginx["volumes"]:
        source, target = str(volume).split(":")[:2]
        mounts[Path(source).name] = target
    conf, upstreams = mounts["nginx.conf"], mounts["upstreams.compose.conf"]
    assert Path(upstreams).name == "upstreams.conf"
    assert Path(conf).parent == Path(upstreams).parent
    for source in ("nginx.conf", "upstreams.compose.conf"):
        assert (DEPLOY / source).is_file()


def test_compose_workers_and_redis(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["sink"]["command"][-2:] == ["worker", "sink"]
    assert services["source"]["command"][-2:] == ["worker", "source"]
    assert services["sink"]["deploy"]["replicas"] == 2
    assert services["source"]["deploy"]["replicas"] == 1
    assert any(str(v).split(":")[0].endswith("redis.conf") for v in services["redis"]["volumes"])
    assert "pg_isready" in json.dumps(services["postgres"]["healthcheck"]["test"])


# --- Kubernetes ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.y*ml")):
        docs.extend(load_yaml_docs(path))
    assert docs, "no manifests in deploy/k8s"
    return docs


def find_doc(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d.get("kind") == kind and d.get("metadata", {}).get("name") == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def test_k8s_documents_are_well_formed(k8s_docs: list[dict[str, Any]]) -> None:
    for doc in k8s_docs:
        assert doc.get("apiVersion"), doc
        assert doc.get("kind"), doc
        assert doc.get("metadata", {}).get("name"), doc
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "ds-gateway", doc["metadata"]
    find_doc(k8s_docs, "Namespace", "ds-gateway")


def test_k8s_gateway_probes(k8s_docs: list[dict[str, Any]]) -> None:
    deployment = find_doc(k8s_docs, "Deployment", "gateway")
    assert deployment["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 30
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "sleep" in container["lifecycle"]["preStop"]["exec"]["command"]
    assert 4437 in [p["containerPort"] for p in container["ports"]]


def test_k8s_service_has_no_affinity(k8s_docs: list[dict[str, Any]]) -> None:
    service = find_doc(k8s_docs, "Service", "gateway")
    assert service["spec"].get("sessionAffinity", "None") != "ClientIP"
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80
    assert port["targetPort"] in (4437, "http")
    gateway = find_doc(k8s_docs, "Deployment", "gateway")
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_k8s_workers_and_migrate(k8s_docs: list[dict[str, Any]]) -> None:
    for name, replicas in (("sink", 2), ("source", 2)):
        deployment = find_doc(k8s_docs, "Deployment", name)
        assert deployment["spec"]["replicas"] == replicas
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["command"][-2:] == ["worker", name]
        refs = {next(iter(e.values()))["name"] for e in container["envFrom"]}
        assert {"dsgw-config", "dsgw-secrets"} <= refs
    job = find_doc(k8s_docs, "Job", "migrate")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"][-1] == "migrate"
    config = find_doc(k8s_docs, "ConfigMap", "dsgw-config")
    assert "REDIS_URL" in config["data"]
    secret = find_doc(k8s_docs, "Secret", "dsgw-secrets")
    assert "DATABASE_URL" in {**secret.get("stringData", {}), **secret.get("data", {})}


# --- Grafana -------------------------------------------------------------------------


def test_grafana_dashboard_covers_every_metric() -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [n["expr"] for n in walk(dashboard.get("panels", [])) if isinstance(n, dict) and "expr" in n]
    assert exprs, "no panel expressions"
    text = "\n".join(exprs)
    missing = [m for m in METRICS if not re.search(rf"\b{m}(_bucket|_sum|_count)?\b", text)]
    assert not missing, f"metrics without a panel: {missing}"
    for metric in HISTOGRAMS:
        quantiles = [e for e in exprs if "histogram_quantile" in e and f"{metric}_bucket" in e]
        assert quantiles, f"{metric} has no histogram_quantile over its buckets"
    variables = [v["name"] for v in dashboard["templating"]["list"]]
    assert "DS_PROMETHEUS" in variables
    assert "${DS_PROMETHEUS}" in json.dumps(dashboard["panels"])


# --- Redis -----------------------------------------------------------------------------


def test_redis_conf_persistence() -> None:
    settings: dict[str, str] = {}
    for line in active_lines(DEPLOY / "redis.conf"):
        key, _, value = line.partition(" ")
        settings[key.lower()] = value.strip()
    assert settings.get("appendonly") == "yes"
    assert settings.get("appendfsync") == "always"
    assert settings.get("maxmemory-policy") == "noeviction"
    assert settings.get("timeout") == "0"


# --- nginx -----------------------------------------------------------------------------


def nginx_directives() -> list[str]:
    return active_lines(DEPLOY / "nginx.conf")


def test_nginx_conf_text() -> None:
    lines = nginx_directives()
    text = "\n".join(lines)
    assert "proxy_buffering off;" in lines
    assert "proxy_request_buffering off;" in lines
    assert "include upstreams.conf;" in lines
    assert re.search(r"upstream\s+dsgw_gateways\s*\{\s*include upstreams\.conf;", text)
    for balancing in ("ip_hash", "sticky", "hash", "least_conn", "random"):
        assert not any(re.match(rf"{balancing}\b", line) for line in lines), balancing
    assert not any(line.startswith("daemon") for line in lines)
    assert not re.search(r"^\s*server\s+[^\s{]+:\d+", text, re.M), (
        "upstream servers must come from upstreams.conf"
    )
    assert "client_max_body_size 8m;" in lines
    assert "listen 8080;" in lines
    timeout = next(line for line in lines if line.startswith("proxy_read_timeout"))
    assert int(re.sub(r"\D", "", timeout)) > 60


@pytest.fixture(scope="module")
def nginx_bin() -> str:
    return ensure_nginx()


def nginx_test(nginx: str, prefix: Path) -> subprocess.CompletedProcess[str]:
    cmd = [nginx, "-t", "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf")]
    usage = subprocess.run([nginx, "-h"], capture_output=True, text=True)
    if "-e filename" in usage.stdout + usage.stderr:
        cmd += ["-e", "stderr"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_nginx_accepts_conf(nginx_bin: str, tmp_path: Path) -> None:
    shutil.copy(DEPLOY / "nginx.conf", tmp_path / "nginx.conf")
    (tmp_path / "upstreams.conf").write_text("server 127.0.0.1:1;\nserver 127.0.0.1:2;\n")
    result = nginx_test(nginx_bin, tmp_path)
    assert result.returncode == 0, result.stderr


def test_nginx_reads_upstreams_from_its_own_dir(nginx_bin: str, tmp_path: Path) -> None:
    # Without an upstreams.conf next to nginx.conf the include must fail: proof
    # that the servers come from that file and the path is relative to it.
    shutil.copy(DEPLOY / "nginx.conf", tmp_path / "nginx.conf")
    result = nginx_test(nginx_bin, tmp_path)
    assert result.returncode != 0
    assert "upstreams.conf" in result.stderr


def test_compose_upstreams_file() -> None:
    lines = active_lines(DEPLOY / "upstreams.compose.conf")
    assert lines == ["server gateway:4437;"]
