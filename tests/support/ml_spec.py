"""Test specs: the shipped customer_ops_ai spec with a unique model name and overrides."""

from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any

import yaml

from opsloop.spec import PipelineSpec, load_spec

EXAMPLE = Path(__file__).resolve().parents[2] / "pipelines" / "customer_ops_ai.yaml"


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and v and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def spec_dict(model: dict[str, Any] | None = None, scoring: dict[str, Any] | None = None) -> dict[str, Any]:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["model"] = _merge(data["model"], {"name": f"churn_{uuid.uuid4().hex[:8]}", **(model or {})})
    data["scoring"] = _merge(data["scoring"], scoring or {})
    return data


def write_spec(tmp_path: Path, data: dict[str, Any] | None = None, **kw: Any) -> tuple[Path, PipelineSpec]:
    data = data if data is not None else spec_dict(**kw)
    path = tmp_path / f"spec-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, load_spec(path)
