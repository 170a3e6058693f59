"""The model card (markdown) and the picture of the data path (SVG) saved with every model.

Both are rendered from ``inspection.describe_model``'s facts, written into the MLflow model's root
before the manifest (so they are covered by it), and shown by the MLflow UI's artifact view.
"""

from __future__ import annotations

import json
from typing import Any
from xml.sax.saxutils import escape

from mlflow_fullmodel.inspection import config_text

__all__ = ["CARD_FILE", "PIPELINE_FILE", "render_card", "render_pipeline", "summary"]

CARD_FILE = "MODEL_CARD.md"
PIPELINE_FILE = "pipeline.svg"

_SHOWN_ROWS = 5


def _step_name(step: dict[str, Any]) -> str:
    return step["target"].rpartition(":")[2]


def _stage(facts: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    return [s for s in facts["steps"] if s["step"].startswith(prefix)]


def summary(facts: dict[str, Any]) -> str:
    """One paragraph: what the model turns into what, through which steps."""
    pre, post = _stage(facts, "preprocess"), _stage(facts, "postprocess")
    forward = next(s for s in facts["steps"] if s["step"] == "forward")
    modules = ", ".join(f"{m['name']} ({m['format']})" for m in facts["modules"])
    params = ", ".join(f"`{p['name']}`" for p in facts["params"]) or "none"
    return (
        f"A fullmodel MLflow model that turns {_columns(facts['inputs'])} into {_columns(facts['outputs'])}: "
        f"{len(pre)} pre-processing step(s) ({', '.join(_step_name(s) for s in pre) or '-'}), the module(s) "
        f"{modules} run by {_step_name(forward)}, and {len(post)} post-processing step(s) "
        f"({', '.join(_step_name(s) for s in post) or '-'}). Runtime parameters: {params}."
    )


def _columns(names: list[str]) -> str:
    return ", ".join(f"`{n}`" for n in names) or "answers"


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict) and set(value) == {"$bytes"}:
        text = f"<{len(value['$bytes']) * 3 // 4} bytes>"
    text = text if len(text) <= 80 else text[:77] + "..."
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def _example_record(facts: dict[str, Any]) -> dict[str, Any]:
    golden = facts["golden"]
    row = golden["inputs"][0] if golden else ""
    row = row if isinstance(row, dict) else {facts["inputs"][0]: row}
    return {k: ("<base64 of the file>" if isinstance(v, dict) and "$bytes" in v else v) for k, v in row.items()}


def _forward_pass(facts: dict[str, Any]) -> list[str]:
    """What runs the forward pass: a compiled package where it can, and how the weights were quantized."""
    lines: list[str] = []
    compiled = [m for m in facts["modules"] if "compiled" in m]
    if compiled:
        target = compiled[0]["compiled"]["target_text"]
        lines += ["", "### Compiled forward pass (AOTInductor)", "",
                  f"Each module below also has a native package, compiled for {target}. A machine that matches runs "
                  "it; any other runs the portable torch.export program (with a log line saying why). The parity "
                  "check holds the package to the golden outputs within the relative tolerance shown, and the "
                  "portable program to them exactly.", ""]
        lines += _table(["module", "package", "size (bytes)", "sha256", "rtol"], [
            [m["name"], m["compiled"]["file"], m["compiled"]["size"], m["compiled"]["sha256"], m["compiled"]["rtol"]]
            for m in compiled
        ])
    quantization = facts.get("quantization")
    if quantization:
        drift = quantization["drift"]
        layers = ", ".join(f"{name}: {count}" for name, count in quantization["layers"].items())
        lines += ["", "### Quantized weights", "",
                  f"{quantization['scheme']}: {quantization['method']}, with {quantization['library']} (layers "
                  f"quantized: {layers}). Drift from the float model on the golden example ({drift['rows']} rows): "
                  f"labels agree on {drift['agreement']:.0%}, the largest difference of an output number is "
                  f"{drift['largest_difference']:.3g}. A row's answer may move slightly with the rows batched "
                  f"beside it (float rounding crosses an int8 step): the parity check allows "
                  f"{quantization.get('rtol', 0):g} (relative) there."]
    return lines


def render_card(facts: dict[str, Any]) -> str:
    """The model card: what the model is, its data path, artifacts, params, signature, golden
    example, and how to call it."""
    lines = ["# Model card", "", summary(facts), "",
             f"A picture of the data path is `{PIPELINE_FILE}`, beside this card.",
             "", "## The data path", ""]
    lines += _table(["step", "class", "configuration"], [
        [s["step"], s["target"], ", ".join(f"{k}={config_text(v)}" for k, v in s["config"].items()) or "-"]
        for s in facts["steps"]
    ])
    lines += ["", f"Rows are batched {facts['batch_size']} at a time.", "", "## Modules", ""]
    lines += _table(["name", "format", "methods", "file", "size (bytes)", "sha256"], [
        [m["name"], m["format"], ", ".join(m["methods"]), m["file"], m["size"], m["sha256"]] for m in facts["modules"]
    ])
    lines += _forward_pass(facts)
    if facts["artifacts"]:
        lines += ["", "## Artifacts", ""]
        lines += _table(["step", "argument", "file", "size (bytes)", "sha256"], [
            [a["step"], a["argument"], a["path"], a["size"], a["sha256"] or "(a folder)"] for a in facts["artifacts"]
        ])
    lines += ["", "## Runtime parameters", ""]
    if facts["params"]:
        lines += _table(["name", "type", "default", "minimum", "maximum", "choices", "step"], [
            [p["name"], p["type"], p["default"], p.get("minimum", "-"), p.get("maximum", "-"), p.get("choices", "-"),
             p["step"]] for p in facts["params"]
        ])
    else:
        lines.append("None.")
    signature = facts["signature"] or {}
    lines += ["", "## Signature", ""]
    for part in ("inputs", "outputs", "params"):
        if signature.get(part):
            specs = json.loads(signature[part])
            lines.append(f"- {part}: " + ", ".join(f"`{s.get('name', '?')}` ({s.get('type', '?')})" for s in specs))
    golden = facts["golden"]
    if golden:
        lines += ["", "## Golden example", "",
                  f"What the training process answered (params {json.dumps(golden['params'])}); the saved "
                  "model must give the same answers, checked at log time and by `mlflow-fullmodel verify`.", ""]
        outputs = list(golden["outputs"][0]) if golden["outputs"] else []
        rows = []
        for raw, answer in list(zip(golden["inputs"], golden["outputs"]))[:_SHOWN_ROWS]:
            values = list(raw.values()) if isinstance(raw, dict) else [raw]
            rows.append(values + [answer[c] for c in outputs])
        inputs = list(golden["inputs"][0]) if isinstance(golden["inputs"][0], dict) else facts["inputs"][:1]
        lines += _table([*inputs, *outputs], rows)
    request: dict[str, Any] = {"dataframe_records": [_example_record(facts)]}
    if facts["params"]:
        request["params"] = {p["name"]: p["default"] for p in facts["params"]}
    lines += ["", "## How to call it", "",
              "Serve it (with MLflow installed; `NAME@ALIAS` is its registered name and alias):", "",
              "```bash", "mlflow models serve -m models:/NAME@ALIAS --env-manager local -p 5001",
              "curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\",
              f"     -d '{json.dumps(request, ensure_ascii=False)}'", "```", "", "In Python:", "", "```python",
              "import mlflow, pandas as pd", "", 'model = mlflow.pyfunc.load_model("models:/NAME@ALIAS")',
              f"model.predict(pd.DataFrame({json.dumps(request['dataframe_records'], ensure_ascii=False)})"
              + (f", params={json.dumps(request['params'])})" if "params" in request else ")"), "```", ""]
    return "\n".join(lines)


_WIDTH, _BOX_HEIGHT, _GAP = 560, 44, 22


def render_pipeline(facts: dict[str, Any]) -> str:
    """The data path as an SVG: raw input, each step, the modules, the answer columns."""
    forward = next(s for s in facts["steps"] if s["step"] == "forward")
    modules = ", ".join(f"{m['name']} ({m['format']})" for m in facts["modules"])
    boxes = [("raw input", ", ".join(facts["inputs"]), "#e8f0fe")]
    boxes += [(s["step"], _step_name(s), "#fef7e0") for s in _stage(facts, "preprocess")]
    collate = next(s for s in facts["steps"] if s["step"] == "collate")
    boxes.append(("collate", f"{_step_name(collate)}, batches of {facts['batch_size']}", "#f1f3f4"))
    boxes.append(("forward", f"{_step_name(forward)}: {modules}", "#fce8e6"))
    boxes += [(s["step"], _step_name(s), "#e6f4ea") for s in _stage(facts, "postprocess")]
    boxes.append(("answer", ", ".join(facts["outputs"]) or "-", "#e8f0fe"))
    height = len(boxes) * (_BOX_HEIGHT + _GAP) + _GAP
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH + 40}" height="{height}" '
        f'viewBox="0 0 {_WIDTH + 40} {height}" font-family="sans-serif" font-size="14">',
        "<title>The data path of this fullmodel model</title>",
        '<defs><marker id="arrow" markerWidth="10" markerHeight="8" refX="9" refY="4" orient="auto">'
        '<path d="M0,0 L10,4 L0,8 z" fill="#5f6368"/></marker></defs>',
    ]
    for index, (label, text, colour) in enumerate(boxes):
        top = _GAP + index * (_BOX_HEIGHT + _GAP)
        parts.append(f'<rect x="20" y="{top}" width="{_WIDTH}" height="{_BOX_HEIGHT}" rx="6" fill="{colour}" '
                     'stroke="#5f6368"/>')
        parts.append(f'<text x="32" y="{top + 27}"><tspan font-weight="bold">{escape(label)}</tspan>'
                     f'<tspan dx="12">{escape(text)}</tspan></text>')
        if index:
            parts.append(f'<line x1="{20 + _WIDTH // 2}" y1="{top - _GAP}" x2="{20 + _WIDTH // 2}" y2="{top - 2}" '
                         'stroke="#5f6368" marker-end="url(#arrow)"/>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
