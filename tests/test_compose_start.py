"""docker-compose.yml from empty volumes: nothing waits on a condition that cannot become
true. The worker starts on an empty /models (it serves co-occurrence meanwhile, docs/design.md
"A model directory may start empty"), the trainer publishes the first checkpoint once, and the
learner starts after it; the keyed latest-per-key topics are created compacted."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from model import checkpoint
from tests.model.test_checkpoint import tiny_model

COMPOSE = Path(__file__).resolve().parents[1] / "docker-compose.yml"


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def script(service: dict) -> str:
    return "\n".join(service["command"])


def test_start_order_from_empty_volumes(services):
    worker, trainer, learner = services["worker"], services["trainer"], services["learner"]
    assert set(worker["depends_on"]) == {"kafka", "topic-init"}  # never on a model being there
    assert "/models" in " ".join(worker["volumes"]) and "/models" in " ".join(trainer["volumes"])
    deps = learner["depends_on"]
    assert deps["trainer"]["condition"] == "service_completed_successfully"
    assert all(dep["condition"] != "service_healthy" for dep in deps.values())
    assert trainer["profiles"] == learner["profiles"] == ["learn"] and trainer["restart"] == "no"
    text = script(trainer)
    # published by a rename from a hidden directory: the worker never sees a partial checkpoint
    assert "--out /models/.tmp-v1" in text and "mv /models/.tmp-v1 /models/v1" in text


def test_trainer_does_nothing_when_a_checkpoint_is_there(services, tmp_path):
    models = tmp_path / "models"
    checkpoint.save(str(models / "v3"), tiny_model(0))
    text = script(services["trainer"]).replace("/models", str(models))
    done = subprocess.run(["/bin/sh", "-ec", text], capture_output=True, text=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin"})  # no streamrec there: it must not get that far
    assert done.returncode == 0 and "has a checkpoint" in done.stdout, done.stderr
    assert sorted(p.name for p in models.iterdir()) == ["v3"]
    empty = tmp_path / "empty"
    empty.mkdir()
    tried = subprocess.run(["/bin/sh", "-ec", script(services["trainer"]).replace("/models", str(empty))],
                           capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert tried.returncode == 127 and "streamrec" in tried.stderr  # empty: it goes on to train


def test_latest_per_key_topics_are_compacted(services):
    lines = script(services["topic-init"]).splitlines()
    for topic in ("recommendations", "catalog.items", "trending"):
        line = next(line for line in lines if f"--topic {topic}" in line)
        assert "cleanup.policy=compact" in line, line
