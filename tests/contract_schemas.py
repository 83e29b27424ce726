"""The published contracts as validators: docs/schemas/*.json (topic records) and the
component schemas of docs/openapi.yaml (HTTP answers), for tests that check real outputs."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator

DOCS = Path(__file__).resolve().parents[1] / "docs"


@lru_cache
def record(name: str) -> Draft202012Validator:
    """docs/schemas/<name>.schema.json: event, recommendation or catalog-item."""
    schema = json.loads((DOCS / "schemas" / f"{name}.schema.json").read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


@lru_cache
def openapi() -> dict:
    return yaml.safe_load((DOCS / "openapi.yaml").read_text())


@lru_cache
def component(name: str) -> Draft202012Validator:
    """#/components/schemas/<name> of docs/openapi.yaml (OpenAPI 3.1 schemas are JSON Schema 2020-12)."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": openapi()["components"]}
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def errors(validator: Draft202012Validator, doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
