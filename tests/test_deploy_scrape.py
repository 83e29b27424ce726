"""The shipped Prometheus config and alert rules against real workers: three worker
processes in one consumer group on the embedded broker (what `docker compose up --scale
worker=3` runs) and a real Prometheus. There is no Compose DNS here, so the config is
generated from deploy/prometheus/prometheus.yml with each `dns_sd_configs` block replaced
by the static targets it would resolve to; everything else (jobs, relabelling, rules) is
the shipped file's."""
from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from stream_app.clients.produce import EventProducer
from stream_app.testing.harness import WorkerProcess
from stream_app.transport.broker import free_port, spawn, stop_process
from tests.test_deploy import PROM_CONFIG, PROM_DIR, REQUIRED_ALERTS, prometheus_tool

WORKERS = 3


def static_from_dns(config: dict, targets: dict[str, list[str]]) -> dict:
    """The shipped config with every job's DNS discovery replaced by `targets[job]`
    (none for a job not named), scrapes and evaluation every second, rule paths absolute
    and no Alertmanager (its address is Compose's)."""
    config = {**config, "global": {**config["global"], "scrape_interval": "1s", "evaluation_interval": "1s"}}
    config["rule_files"] = [str(PROM_DIR / f) for f in config["rule_files"]]
    config.pop("alerting", None)
    jobs = []
    for job in config["scrape_configs"]:
        assert "dns_sd_configs" in job, f"{job['job_name']}: the compose config discovers targets by DNS"
        job = {k: v for k, v in job.items() if k != "dns_sd_configs"}
        job.update(scrape_interval="1s", scrape_timeout="1s",
                   static_configs=[{"targets": targets.get(job["job_name"], [])}])
        jobs.append(job)
    config["scrape_configs"] = jobs
    return config


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=3) as resp:
        return json.load(resp)


@pytest.mark.integration
@pytest.mark.timeout(150)
def test_prometheus_scrapes_every_worker_of_a_scaled_group(make_settings, tmp_path):
    """Three workers share the partitions; the shipped config scrapes all three (up == 1
    each, with the relabelled service label), their process metrics and build info, each
    partition's lag exactly once over the group, and every alert rule evaluates."""
    binary = prometheus_tool("prometheus")
    base = make_settings(partitions=WORKERS)
    workers = [WorkerProcess(base.model_copy(update={"state_dir": tmp_path / f"state-{i}", "web_port": free_port()}),
                             tmp_path / f"worker-{i}.log") for i in range(WORKERS)]
    proc = None
    try:
        first = workers[0].start().wait_ready()  # owns every partition and exports its lag, until the others join
        deadline = time.monotonic() + 30
        while len([k for k in first.metrics() if k.startswith("streamrec_consumer_lag{")]) < WORKERS:
            assert time.monotonic() < deadline, first.log_tail()
            time.sleep(0.25)
        for w in workers[1:]:
            w.start()
        for w in workers[1:]:
            w.wait_ready()
        deadline = time.monotonic() + 60
        while sorted(p for w in workers for p in w.partitions()) != list(range(WORKERS)):
            assert time.monotonic() < deadline, f"partitions not split: {[w.partitions() for w in workers]}"
            time.sleep(0.25)

        producer = EventProducer(base.bootstrap_servers, base.events_topic)
        for i in range(5):
            producer.send_event({"event_id": f"deploy-{i}", "user_id": f"deploy-user-{i}", "type": "click",
                                 "item_id": f"item-{i}", "ts": time.time()})
        producer.close()

        targets = [f"127.0.0.1:{w.settings.web_port}" for w in workers]
        config = static_from_dns(yaml.safe_load(PROM_CONFIG.read_text()), {"streamrec": targets})
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        for d in ("tsdb", "consoles", "console_libraries"):
            (tmp_path / d).mkdir()
        port = free_port()
        api = f"http://127.0.0.1:{port}/api/v1"
        log_path = tmp_path / "prometheus.log"
        with log_path.open("wb") as log:
            proc = spawn([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                          f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
                          f"--web.console.templates={tmp_path / 'consoles'}",
                          f"--web.console.libraries={tmp_path / 'console_libraries'}"],
                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def query(promql: str) -> list:
            data = _get_json(f"{api}/query?" + urllib.parse.urlencode({"query": promql}))
            assert data["status"] == "success", data
            return data["data"]["result"]

        def wait_for(what: str, check, timeout: float = 30.0):
            deadline = time.monotonic() + timeout
            last = None
            while time.monotonic() < deadline:
                assert proc.poll() is None, f"prometheus exited {proc.returncode}:\n{log_path.read_text()[-3000:]}"
                try:
                    last = check()
                    if last:
                        return last
                except OSError as exc:  # not listening yet
                    last = exc
                time.sleep(0.25)
            logs = "\n".join(f"{w.log_path.name}:\n{w.log_tail(10)}" for w in workers)
            raise AssertionError(f"timed out waiting for {what} (last: {last!r})\n"
                                 f"prometheus log:\n{log_path.read_text()[-3000:]}\n{logs}")

        def per_target(promql: str):
            result = query(promql)
            return result if sorted(r["metric"]["instance"] for r in result) == sorted(targets) else None

        up = wait_for("every worker up", lambda: per_target('up{job="streamrec", service="streamrec-worker"} == 1'))
        assert len(up) == WORKERS
        wait_for("one partition owned by each", lambda: per_target('streamrec_assigned_partitions{job="streamrec"} == 1'))

        def lag_once():  # the first worker owned every partition before the others joined
            series = query(f'streamrec_consumer_lag{{job="streamrec", topic="{base.events_topic}"}}')
            partitions = sorted(r["metric"]["partition"] for r in series)
            return series if partitions == [str(p) for p in range(WORKERS)] else None

        lag = wait_for("each partition's lag exported by its owner only", lag_once)
        assert len({r["metric"]["instance"] for r in lag}) == WORKERS, lag
        assert per_target('process_resident_memory_bytes{job="streamrec"} > 1e7')
        build = per_target('streamrec_build_info{job="streamrec"} == 1')
        assert build and all(r["metric"]["version"] and r["metric"]["torch"] for r in build)
        events = wait_for("5 events counted", lambda: [
            r for r in query('sum(streamrec_events_total{job="streamrec"})') if float(r["value"][1]) >= 5])
        assert float(events[0]["value"][1]) == 5.0
        assert query('streamrec_events_total{job="streamrec", type="view"}'), "zero-initialised series missing"

        def rules_evaluated():
            groups = _get_json(f"{api}/rules")["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            return rules if rules and all(r["health"] == "ok" for r in rules) else None

        rules = wait_for("alert rules evaluated", rules_evaluated)
        assert {r["name"] for r in rules} >= REQUIRED_ALERTS
        firing = [r["name"] for r in rules if r["state"] != "inactive"]
        assert not {"StreamrecWorkerDown", "StreamrecLearnerDown"} & set(firing), firing
    finally:
        if proc is not None:
            stop_process(proc, timeout=10)
        for w in workers:
            w.stop()
