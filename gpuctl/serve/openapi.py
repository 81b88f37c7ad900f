"""The OpenAPI document's schemas, from what gpuctl already defines (nothing is written twice):

* request bodies: the request models of gpuctl/models.py, with every optional field also ``null`` (null means
  "the default", as the running service treats it) and unknown fields allowed (they are ignored);
* responses: the ``$defs`` of gpuctl/schemas/output.schema.json (the CLI's ``--output json`` documents), moved
  under ``components/schemas`` with their ``$ref``\\ s rewritten;
* the API's own documents (health, index, errors), defined here.
"""

from __future__ import annotations

import copy
from typing import Any

from gpuctl.models import JobType

__all__ = ["ERROR", "HEALTH", "INDEX", "VALIDATION_ERROR", "add_components", "request_schema", "response"]

_PREFIX = "gpuctl_"
ERROR = "error"
VALIDATION_ERROR = "validation_error"
HEALTH = "health"
INDEX = "index"

_OWN: dict[str, Any] = {
    ERROR: {"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]},
    VALIDATION_ERROR: {
        "type": "object",
        "properties": {"detail": {"type": "array", "items": {
            "type": "object",
            "properties": {"loc": {"type": "array", "items": {"type": ["string", "integer"]}},
                           "msg": {"type": "string"}, "type": {"type": "string"}},
            "required": ["loc", "msg", "type"]}}},
        "required": ["detail"],
    },
    HEALTH: {
        "type": "object",
        "properties": {
            "status": {"enum": ["healthy", "unhealthy"]},
            "message": {"type": "string"},
            "components": {"type": "object", "properties": {"dynamodb": {"type": "string"},
                                                            "sqs": {"type": "string"}},
                           "required": ["dynamodb", "sqs"]},
            "service": {"const": "gpu-task-orchestrator"},
            "version": {"type": "string"},
            "gpuctl_version": {"type": "string"},
        },
        "required": ["status", "message", "components", "service", "version"],
    },
    INDEX: {
        "type": "object",
        "properties": {"service": {"type": "string"}, "version": {"type": "string"},
                       "description": {"type": "string"},
                       "endpoints": {"type": "object", "additionalProperties": {"type": "string"}}},
        "required": ["service", "version", "description", "endpoints"],
    },
}


def _name(definition: str) -> str:
    return f"{_PREFIX}{definition}"


def _rewrite_refs(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: (f"#/components/schemas/{_name(v.removeprefix('#/$defs/'))}"
                    if k == "$ref" and isinstance(v, str) and v.startswith("#/$defs/") else _rewrite_refs(v))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite_refs(v) for v in node]
    return node


def add_components(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with gpuctl's output schemas and the API's own under ``components/schemas``."""
    from gpuctl.schemas import load

    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in {**load()["$defs"], **_OWN}.items():
        schemas[_name(name)] = _rewrite_refs(copy.deepcopy(definition))
    return document


def response(definition: str, description: str) -> dict[str, Any]:
    """An OpenAPI response whose JSON body follows ``definition``."""
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{_name(definition)}"}}}}


def request_schema(job_type: JobType) -> dict[str, Any]:
    """The JSON body of ``POST /api/v1/<job type>/jobs``: the request model, every optional field nullable."""
    schema = job_type.request_model.model_json_schema(mode="validation")
    schema.pop("title", None)
    required = set(schema.get("required", []))
    for name, prop in schema.get("properties", {}).items():
        prop.pop("title", None)
        if name.endswith("_url"):
            prop.setdefault("description", "an s3://bucket/key URI or an https:// URL (checked as `gpuctl submit` "
                                           "checks it)")
        if name in required:
            continue
        variants = prop.pop("anyOf", None) or [{k: prop.pop(k) for k in list(prop) if k not in ("default",
                                                                                                 "description")}]
        if not any(v.get("type") == "null" for v in variants):
            variants.append({"type": "null"})
        prop["anyOf"] = variants
    schema["additionalProperties"] = True
    return schema
