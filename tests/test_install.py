"""The README's install path as a user takes it: the wheel built from the clone, installed with an
extra into a fresh virtual environment (nothing of this checkout on its path), its command run and
a saved model loaded and answering there as it answers here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from support import EXAMPLE_TEXTS

import mlflow_fullmodel as fm

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200, **kwargs)
    assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-4000:])
    return result


def test_the_built_wheel_installs_with_an_extra_in_a_fresh_venv_and_loads_a_saved_model(tmp_path, text_model):
    run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path / "dist"), str(ROOT)])
    wheel, = (tmp_path / "dist").glob("mlflow_fullmodel-*-py3-none-any.whl")
    assert wheel.name == f"mlflow_fullmodel-{fm.__version__}-py3-none-any.whl"

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    # As the README says: torch first (its CPU build), then the wheel with its extra. Without
    # compiling every module to bytecode up front, most of an install's time and not what is tested.
    run([python, "-m", "pip", "install", "--quiet", "--no-compile", f"torch=={torch.__version__.split('+')[0]}"])
    run([python, "-m", "pip", "install", "--quiet", "--no-compile", f"{wheel}[hf,sentencepiece]",
         f"mlflow=={mlflow.__version__}"])

    version = run([str(venv / "bin" / "mlflow-fullmodel"), "--version"], cwd=tmp_path)
    assert version.stdout.strip() == f"mlflow-fullmodel, version {fm.__version__}"

    fm.save_model(text_model, str(tmp_path / "model"), input_example=EXAMPLE_TEXTS)
    script = ("import json, sys, tokenizers, mlflow_fullmodel as fm\n"
              "print(json.dumps({'from': fm.__file__, 'answer': fm.load_model(sys.argv[1]).predict(json.loads(sys.argv[2]))"
              ".to_dict(orient='list')}))")
    loaded = run([python, "-I", "-c", script, str(tmp_path / "model"), json.dumps(EXAMPLE_TEXTS)], cwd=tmp_path)
    result = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert result["from"].startswith(str(venv))  # the installed wheel, not this checkout
    expected = text_model.predict(EXAMPLE_TEXTS)
    assert result["answer"]["top_labels"] == [list(labels) for labels in expected["top_labels"]]
    assert result["answer"]["probability"] == pytest.approx(expected["probability"].tolist(), rel=1e-5)
