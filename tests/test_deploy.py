"""Deployment artefacts agree with the code: docker-compose.yml, Dockerfile, Prometheus
config and alert rules, Grafana provisioning and dashboard.

Static checks (fast) compare the files with stream_app.config.Settings and the metric
registry in stream_app.metrics; promtool validates the config and rules and runs the
alert unit tests; tests/test_deploy_scrape.py scrapes real workers with a real Prometheus.

promtool and prometheus come from the Debian package: `apt-get install -y prometheus`.
Without them these tests fail, unless STREAMREC_SKIP_PROMETHEUS=1 (then they skip)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from stream_app.config import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROM_DIR = ROOT / "deploy" / "prometheus"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "streamrec.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "dashboards.yml"
ALERTMANAGER_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"

FIELDS = Settings.model_fields
CATALOG_TOPIC = FIELDS["catalog_topic"].default

REQUIRED_ALERTS = {
    "StreamrecWorkerDown", "StreamrecConsumerLagGrowing", "StreamrecDeadLetterRateHigh",
    "StreamrecLatencyP99High", "StreamrecNoRecommendations", "StreamrecCacheHitRatioLow",
    "StreamrecServedModelStale", "StreamrecLearnerDown", "StreamrecEnvironmentFailures", "StreamrecWorkerStalled",
    "StreamrecCatalogRejects", "StreamrecNoModel",
}
METRIC_RE = re.compile(r"\b(?:streamrec|process|python)_[a-zA-Z0-9_]+\b")  # ours + runtime collectors
ENV_RE = re.compile(r"\bSTREAMREC_[A-Z0-9_]+\b")
INTERP_RE = re.compile(r"\$\{([A-Z0-9_]+):-([^}]*)\}")  # ${VAR:-default}


def default(name: str):
    return FIELDS[name].default


def interpolate(value) -> str:
    """Compose `${VAR:-default}` -> default (what an unconfigured `docker compose up` uses)."""
    return INTERP_RE.sub(lambda m: m.group(2), str(value))


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: interpolate(v) for k, v in env.items()}


def command_text(service: dict) -> str:
    cmd = service.get("command") or ""
    return "\n".join(cmd) if isinstance(cmd, list) else str(cmd)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


# --------------------------------------------------------------------- compose vs Settings

def test_every_streamrec_env_var_is_a_setting():
    """Settings ignores unknown env vars (extra="ignore"), so a typo would pass silently."""
    for path in (COMPOSE, DOCKERFILE):
        used = {m.group(0) for m in ENV_RE.finditer(path.read_text())}
        assert used, path
        unknown = sorted(v for v in used if v[len("STREAMREC_"):].lower() not in FIELDS)
        assert not unknown, f"{path.name} uses env vars that are not Settings fields: {unknown}"


def test_compose_env_values_validate(services):
    """Every STREAMREC_* value in compose is accepted by Settings (types, bounds)."""
    for name, svc in services.items():
        values = {k[len("STREAMREC_"):].lower(): v for k, v in env_of(svc).items() if k.startswith("STREAMREC_")}
        values = {k: v for k, v in values.items() if k in FIELDS}
        Settings(**values)  # raises ValidationError on a bad value


def test_partitions_follow_streamrec_partitions(compose, services):
    raw = COMPOSE.read_text()
    defaults = {m.group(2) for m in INTERP_RE.finditer(raw) if m.group(1) == "STREAMREC_PARTITIONS"}
    assert defaults == {str(default("partitions"))}, defaults
    for name in ("topic-init", "worker"):
        assert services[name]["environment"]["STREAMREC_PARTITIONS"] == "${STREAMREC_PARTITIONS:-%d}" % default(
            "partitions"), name
    creates = command_text(services["topic-init"])
    assert '--partitions "$$STREAMREC_PARTITIONS"' in creates


def test_topic_init_creates_the_settings_topics(services):
    init = services["topic-init"]
    text = command_text(init)
    topics = re.findall(r"--topic\s+(\S+)", text)
    expected = [default("events_topic"), default("dlq_topic"), default("recommendations_topic"), CATALOG_TOPIC,
                default("trending_topic")]
    assert sorted(topics) == sorted(expected)
    for compacted in (CATALOG_TOPIC, default("trending_topic")):
        line = next(line for line in text.splitlines() if f"--topic {compacted}" in line)
        assert "cleanup.policy=compact" in line
    assert "--if-not-exists" in text  # re-running `docker compose up` must not fail
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_kafka_is_kraft_with_healthcheck(services):
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = env_of(kafka)
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "healthcheck" in kafka and kafka["healthcheck"]["test"]
    assert "kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert env_of(services["worker"])["STREAMREC_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env_of(services["producer"])["STREAMREC_BOOTSTRAP_SERVERS"] == "kafka:9092"


def test_images_are_pinned(services):
    for name, svc in services.items():
        if "build" in svc:
            continue
        image = svc["image"]
        tag = image.rpartition(":")[2]
        assert ":" in image and tag and tag != "latest", f"{name}: pin the image tag ({image})"


def test_worker_port_health_and_scrape_target_agree(services):
    port = default("web_port")
    worker = services["worker"]
    env = env_of(worker)
    assert env["STREAMREC_WEB_PORT"] == str(port)
    assert env["STREAMREC_WEB_HOST"] == "0.0.0.0"
    # scalable: every published port leaves the host port to Docker (HOST_IP::CONTAINER_PORT)
    assert [str(p) for p in worker["ports"]] == [f"127.0.0.1::{port}"]
    health = " ".join(worker["healthcheck"]["test"])
    assert f"localhost:{port}/healthz" in health
    deps = worker["depends_on"]
    assert deps["kafka"]["condition"] == "service_healthy"
    assert deps["topic-init"]["condition"] == "service_completed_successfully"
    assert worker["command"] == ["worker"]
    assert services["producer"]["command"][:2] == ["produce", "--synthetic"]

    prom = yaml.safe_load(PROM_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    job = jobs["streamrec"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["scrape_interval"] == "5s"
    assert "static_configs" not in job, "replicas are found by DNS, not listed"
    assert job["dns_sd_configs"] == [{"names": ["worker"], "type": "A", "port": port, "refresh_interval": "15s"}]
    learner = jobs["streamrec-learner"]["dns_sd_configs"]
    assert learner == [{"names": ["learner"], "type": "A", "port": default("learn_port"), "refresh_interval": "15s"}]
    assert env_of(services["learner"])["STREAMREC_LEARN_PORT"] == str(default("learn_port"))

    dockerfile = DOCKERFILE.read_text()
    assert re.search(rf"^EXPOSE\s+{port}\b", dockerfile, re.M)
    assert f"STREAMREC_WEB_PORT={port}" in dockerfile


def test_volumes_for_state_models_and_metrics(compose, services):
    declared = set(compose["volumes"])
    worker = services["worker"]
    env = env_of(worker)
    mounts = dict(v.split(":")[:2][::-1] for v in worker["volumes"] if ":" in v)  # container path -> source
    assert mounts.get(env["STREAMREC_MODEL_DIR"]) in declared, "models are shared on a named volume"
    assert env["STREAMREC_MODEL_DIR"] == "/models"
    # state: an anonymous volume, so every replica of `--scale worker=N` has its own RocksDB dir
    assert env["STREAMREC_STATE_DIR"] in worker["volumes"], "worker state must be an anonymous volume"
    assert env["STREAMREC_STATE_DIR"] not in mounts
    prom_sources = {v.split(":")[0] for v in services["prometheus"]["volumes"]}
    assert prom_sources & declared, "prometheus data needs a named volume"
    for name, svc in services.items():  # bind mounts point at files in the repo
        for v in svc.get("volumes", []):
            source = v.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source} missing"


def test_alertmanager_is_wired(services):
    am = services["alertmanager"]
    assert am["image"].startswith("prom/alertmanager:")
    mounts = dict(v.split(":")[:2] for v in am["volumes"])
    config_path = mounts["./deploy/alertmanager/alertmanager.yml"]
    assert f"--config.file={config_path}" in am["command"]
    am_port = am["ports"][0].split(":")[-1]
    assert "alertmanager" in services["prometheus"]["depends_on"]
    prom = yaml.safe_load(PROM_CONFIG.read_text())
    targets = [t for a in prom["alerting"]["alertmanagers"] for sc in a["static_configs"] for t in sc["targets"]]
    assert targets == [f"alertmanager:{am_port}"]
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    receivers = {r["name"] for r in config["receivers"]}

    def routes(route):
        yield route
        for child in route.get("routes", []):
            yield from routes(child)
    assert {r["receiver"] for r in routes(config["route"]) if "receiver" in r} <= receivers
    amtool = shutil.which("amtool")  # Debian: prometheus-alertmanager; optional for `make test`
    if amtool:
        proc = subprocess.run([amtool, "check-config", str(ALERTMANAGER_CONFIG)], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gpu_reservation_block_present_but_commented():
    raw = COMPOSE.read_text()
    assert re.search(r"^\s*#\s*(-\s*)?driver: nvidia", raw, re.M)
    assert "nvidia" not in yaml.safe_dump(yaml.safe_load(raw))


def test_dockerfile_installs_cpu_torch_pin_first_as_non_root():
    text = DOCKERFILE.read_text()
    assert text.startswith("#") and re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    torch = re.search(r"^RUN pip install .*-r \S*requirements/cpu-torch\.txt", text, re.M)
    project = re.search(r"^RUN pip install (/src|\.)(\s|$)", text, re.M)
    assert torch and project and torch.start() < project.start()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["streamrec"\]', text, re.M)
    assert re.search(r"^RUN apt-get .*install .*libjemalloc2", text, re.M)  # the worker's allocator
    ignore = (ROOT / ".dockerignore").read_text().split()
    for needed in ("!pyproject.toml", "!requirements/", "!stream_app/", "!model/"):
        assert needed in ignore


def test_torch_pin_comes_from_one_index_setting_everywhere(compose):
    """make, the Dockerfile and Compose take the torch pin from TORCH_INDEX_URL, the CPU
    wheels unless told; docs/model.md's GPU command overrides that same name (PyPI's
    build of the pin is the CUDA one)."""
    cpu = "https://download.pytorch.org/whl/cpu"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^TORCH_CPU_INDEX := {re.escape(cpu)}$", makefile, re.M)
    assert re.search(r"^TORCH_INDEX_URL \?= \$\(TORCH_CPU_INDEX\)$", makefile, re.M)
    # a local CPU build of the pin is taken first, so no unreachable index is ever asked
    assert re.search(r'pip install -q "\$\(TORCH_PIN\)\+cpu"', makefile)
    assert re.search(r"pip install .*--extra-index-url \$\(TORCH_INDEX_URL\) -r requirements/cpu-torch\.txt",
                     makefile)
    dockerfile = DOCKERFILE.read_text()
    assert f"ARG TORCH_INDEX_URL={cpu}" in dockerfile
    assert re.search(r'^RUN pip install --index-url "\$\{TORCH_INDEX_URL\}" -r ', dockerfile, re.M)
    assert interpolate(compose["x-streamrec-image"]["build"]["args"]["TORCH_INDEX_URL"]) == cpu
    gpu = "TORCH_INDEX_URL=https://pypi.org/simple"
    assert f"make setup {gpu}" in (ROOT / "docs" / "model.md").read_text()
    assert gpu in dockerfile and gpu in COMPOSE.read_text()


# --------------------------------------------------------------------- metric names

def _registry_samples() -> dict[str, set[str]]:
    """Family name -> the sample names Prometheus stores for it."""
    from stream_app import metrics

    out: dict[str, set[str]] = {}
    for fam in [*metrics.REGISTRY.collect(), *metrics.LEARNER_REGISTRY.collect()]:
        if fam.type == "counter":
            names = {fam.name + "_total", fam.name + "_created"}
        elif fam.type == "histogram":
            names = {fam.name + s for s in ("_bucket", "_sum", "_count", "_created")}
        elif fam.type == "summary":
            names = {fam.name, fam.name + "_sum", fam.name + "_count", fam.name + "_created"}
        elif fam.type == "gauge":
            names = {fam.name}
        else:
            raise AssertionError(f"teach test_deploy about metric type {fam.type} ({fam.name})")
        out[fam.name] = names
    return out


REGISTRY_SAMPLES = _registry_samples()
KNOWN_NAMES = set().union(*REGISTRY_SAMPLES.values())


def dashboard_panels(panels: list) -> list[dict]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(dashboard_panels(p.get("panels", [])))
    return out


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def dashboard_exprs(dashboard) -> list[str]:
    return [t["expr"] for p in dashboard_panels(dashboard["panels"]) for t in p.get("targets", []) if t.get("expr")]


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_registry_is_what_we_think():
    assert "streamrec_events" in REGISTRY_SAMPLES and len(REGISTRY_SAMPLES) >= 15


def test_every_metric_has_a_dashboard_panel(dashboard_exprs):
    used = {name for e in dashboard_exprs for name in METRIC_RE.findall(e)}
    missing = sorted(fam for fam, names in REGISTRY_SAMPLES.items() if not names & used)
    assert not missing, f"metrics without a dashboard panel: {missing}"


def test_dashboard_and_alerts_use_only_real_metrics(dashboard_exprs):
    sources = {"dashboard": dashboard_exprs, "alerts.yml": [r["expr"] for r in alert_rules()]}
    tests = yaml.safe_load(ALERTS_TEST.read_text())
    sources["alerts_test.yml"] = [s["series"] for t in tests["tests"] for s in t["input_series"]]
    for where, exprs in sources.items():
        unknown = sorted({n for e in exprs for n in METRIC_RE.findall(e)} - KNOWN_NAMES)
        assert not unknown, f"{where} uses metric names that stream_app/metrics.py does not export: {unknown}"


def test_dashboard_structure(dashboard):
    panels = dashboard_panels(dashboard["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    ds = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert dashboard["uid"] == "streamrec"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == ds[0]["type"] == "prometheus"
    uids = {"${datasource}"}  # chosen on the dashboard: no datasource uid is hard-coded
    hard_coded = re.findall(r'"uid":\s*"([^"$-][^"]*)"', DASHBOARD.read_text())
    assert hard_coded == ["streamrec"], f"hard-coded uids besides the dashboard's own: {hard_coded}"
    assert variables["instance"]["datasource"]["uid"] == "${datasource}"
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["targets"] and all(t.get("expr") for t in p["targets"]), p["title"]
        assert p["datasource"]["uid"] in uids, p["title"]
        assert all(t["datasource"]["uid"] in uids for t in p["targets"]), p["title"]
    assert any(p["type"] == "table" and "streamrec_model_info" in p["targets"][0]["expr"] for p in panels)
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    compose = yaml.safe_load(COMPOSE.read_text())
    grafana_mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert grafana_mounts["./deploy/grafana/dashboards"] == providers[0]["options"]["path"]
    assert grafana_mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    prom_port = compose["services"]["prometheus"]["ports"][0].split(":")[-1]
    assert ds[0]["url"] == f"http://prometheus:{prom_port}"


def test_alert_rules_are_complete():
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    assert REQUIRED_ALERTS <= names, REQUIRED_ALERTS - names
    for r in rules:
        assert r.get("for"), r["alert"]
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["annotations"].get("summary") and r["annotations"].get("description"), r["alert"]


# --------------------------------------------------------------------- promtool

def prometheus_tool(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("STREAMREC_SKIP_PROMETHEUS") == "1":
        pytest.skip(f"{name} not installed and STREAMREC_SKIP_PROMETHEUS=1")
    pytest.fail(f"{name} not found on PATH: install it with `apt-get install -y prometheus` "
                f"(Debian package, Prometheus 2.42 + promtool), or set STREAMREC_SKIP_PROMETHEUS=1 to skip")


def promtool(*args: str, cwd: Path = ROOT) -> str:
    proc = subprocess.run([prometheus_tool("promtool"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{out}"
    return out


def test_promtool_check_config():
    promtool("check", "config", str(PROM_CONFIG.relative_to(ROOT)))
    promtool("check", "config", str((PROM_DIR / "prometheus.local.yml").relative_to(ROOT)))


def test_promtool_check_rules():
    out = promtool("check", "rules", str(ALERTS.relative_to(ROOT)))
    assert f"{len(alert_rules())} rules found" in out


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    cases: dict[str, set[bool]] = {}
    for t in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for case in t.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], set()).add(bool(case["exp_alerts"]))
    for rule in alert_rules():
        assert cases.get(rule["alert"]) == {True, False}, f"{rule['alert']}: needs a firing and a not-firing case"


def test_promtool_alert_unit_tests():
    promtool("test", "rules", str(ALERTS_TEST.relative_to(ROOT)))


def test_dashboard_exprs_are_valid_promql(dashboard_exprs, tmp_path):
    """Each panel query (Grafana variables replaced) as a recording rule through promtool."""
    grafana_vars = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "$instance": ".*"}
    rules = []
    for i, expr in enumerate(dashboard_exprs):
        for var, value in grafana_vars.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr}"
        rules.append({"record": f"dashboard:expr_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool("check", "rules", str(path))
