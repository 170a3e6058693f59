"""save_model(compile="aoti"): an AOTInductor package beside the portable torch.export program, the
one that runs where torch, the CPU and the device match, the portable one elsewhere (saying why
once), both held to the golden example by the parity check, and shown by inspect and the card.

Real compilation with the machine's C++ compiler: one model compiled for the module, one more
package for the test that swaps it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from asgi import call, loaded
from click.testing import CliRunner
from sample_steps import LABELS, BagOfIds, Normalize
from support import EXAMPLE_TEXTS

import mlflow_fullmodel as fm
from mlflow_fullmodel.cli import main
from mlflow_fullmodel.compiled import Target
from mlflow_fullmodel.flavor import check_parity_of
from mlflow_fullmodel.parity import compare_outputs
from mlflow_fullmodel.storage import read_golden
from mlflow_fullmodel.storage.integrity import read_manifest, write_manifest
from mlflow_fullmodel.transforms import SentencePieceEncode, TopK
from mlflow_fullmodel.verification import verify_model

RTOL = 2e-4


def eager_model(spm_path: str, seed: int = 0) -> fm.FullModel:
    torch.manual_seed(seed)
    return fm.FullModel(
        preprocess=[Normalize(), SentencePieceEncode(fm.Artifact(spm_path), max_length=32)],
        module=BagOfIds(vocab_size=64, classes=len(LABELS)),
        postprocess=[TopK(labels=LABELS, k=fm.Param(1, minimum=1, maximum=len(LABELS)))],
        batch_size=2,
    )


@pytest.fixture(scope="module")
def compiled_path(spm_path: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("compiled") / "model"
    fm.save_model(eager_model(spm_path), str(path), input_example=EXAMPLE_TEXTS, compile="aoti", compile_rtol=RTOL)
    return path


def spec_of(path: Path) -> dict:
    return json.loads((path / "fullmodel" / "fullmodel.json").read_text())


def edit_spec(path: Path, change) -> None:
    """Change the spec as a model saved elsewhere would have it, and the manifest to match."""
    spec = spec_of(path)
    change(spec)
    (path / "fullmodel" / "fullmodel.json").write_text(json.dumps(spec))
    write_manifest(str(path))


def golden_outputs(path: Path) -> pd.DataFrame:
    golden = read_golden(str(path / "fullmodel"))
    assert golden is not None
    return golden.outputs


def test_the_package_is_saved_beside_the_portable_program_with_its_target_and_the_manifest_covers_it(compiled_path):
    entry = spec_of(compiled_path)["modules"]["main"]
    assert (entry["file"], entry["format"]) == ("modules/main.pt2", "torch.export")
    compiled = entry["compiled"]
    assert compiled["file"] == "modules/main.aoti.pt2" and compiled["compiler"] == "aoti"
    assert compiled["target"] == Target.compiled_for("cpu").to_json() and compiled["rtol"] == RTOL
    assert Target.compiled_for("cpu").mismatch(Target.here("cpu")) is None
    package = compiled_path / "fullmodel" / "modules" / "main.aoti.pt2"
    with zipfile.ZipFile(package) as archive:
        libraries = {info.filename: hashlib.sha256(archive.read(info)).hexdigest()
                     for info in archive.infolist() if info.filename.endswith(".so")}
    assert libraries and compiled["native"] == libraries
    assert {"fullmodel/modules/main.pt2", "fullmodel/modules/main.aoti.pt2"} <= set(read_manifest(str(compiled_path)).files)
    flavor = yaml.safe_load((compiled_path / "MLmodel").read_text())["flavors"]["fullmodel"]
    assert flavor["compiled"] == {"main": {"compiler": "aoti", **Target.compiled_for("cpu").to_json()}}


def test_the_package_runs_here_within_its_tolerance_and_the_portable_program_exactly_when_asked(compiled_path):
    expected = golden_outputs(compiled_path)
    served = fm.load_model(str(compiled_path))
    assert list(served.module.compiled) == ["main"]
    assert type(served.module.runnable("main", torch.device("cpu"))).__name__ == "AOTICompiledModel"
    assert compare_outputs(expected, served.predict(EXAMPLE_TEXTS), rel_tol=RTOL) == []

    portable = fm.load_model(str(compiled_path), compiled=False)
    assert portable.module.compiled == {}
    assert isinstance(portable.module["main"], torch.export.ExportedProgram)
    assert compare_outputs(expected, portable.predict(EXAMPLE_TEXTS)) == []

    pyfunc = mlflow.pyfunc.load_model(str(compiled_path))
    answers = pyfunc.predict(pd.DataFrame({"text": EXAMPLE_TEXTS}))
    assert compare_outputs(expected, answers, rel_tol=RTOL) == []


@pytest.mark.parametrize("field, value, named", [
    ("isa", "avx512 neon", "CPU instruction sets 'avx512 neon' (here: "),
    ("torch_version", "2.1.0", "torch '2.1.0'"),
    ("machine", "aarch64", "CPU architecture 'aarch64'"),
])
def test_a_model_compiled_for_another_machine_runs_its_portable_program_and_says_why_once(
    compiled_path, tmp_path, caplog, field, value, named
):
    copy = tmp_path / "model"
    shutil.copytree(compiled_path, copy)
    edit_spec(copy, lambda spec: spec["modules"]["main"]["compiled"]["target"].__setitem__(field, value))
    with caplog.at_level(logging.INFO, logger="mlflow_fullmodel"):
        loaded = fm.load_model(str(copy))
    said = [r.getMessage() for r in caplog.records if "AOTInductor package" in r.getMessage()]
    assert len(said) == 1 and named in said[0] and "portable torch.export program" in said[0]
    assert loaded.module.compiled == {}
    assert compare_outputs(golden_outputs(copy), loaded.predict(EXAMPLE_TEXTS)) == []  # exactly: the program

    facts = json.loads(CliRunner().invoke(main, ["inspect", str(copy), "--json"]).stdout)
    compiled = facts["modules"][0]["compiled"]
    assert compiled["runs_here"] is False and named in compiled["why_not"]


def test_code_for_fewer_instruction_sets_runs_on_a_cpu_with_more_but_not_the_other_way_round():
    older, newer = (Target("2.13.0", "x86_64", isa, "cpu") for isa in ("avx2", "amx_tile avx2 avx512"))
    assert older.mismatch(newer) is None
    assert newer.mismatch(older) == "compiled for CPU instruction sets 'amx_tile avx2 avx512' (here: 'avx2', " \
                                    "without amx_tile avx512)"
    assert older.mismatch(Target("2.14.0", "x86_64", "avx2", "cuda")) == \
        "compiled for torch '2.13.0' (here: '2.14.0'), device 'cpu' (here: 'cuda')"


def test_a_changed_package_is_refused_before_it_is_loaded(compiled_path, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(compiled_path, copy)
    package = copy / "fullmodel" / "modules" / "main.aoti.pt2"
    data = bytearray(package.read_bytes())
    data[len(data) // 2] ^= 0xFF
    package.write_bytes(bytes(data))
    with pytest.raises(fm.IntegrityError, match="main.aoti.pt2"):
        fm.load_model(str(copy))


def test_the_parity_check_holds_the_package_to_the_golden_outputs_within_its_tolerance(
    compiled_path, spm_path, tmp_path
):
    # A package compiled from other weights: the portable program still reproduces the golden
    # example exactly, so only the compiled half of the check can fail.
    other = tmp_path / "other"
    fm.save_model(eager_model(spm_path, seed=1), str(other), input_example=EXAMPLE_TEXTS, compile="aoti",
                  check_parity=False)
    copy = tmp_path / "model"
    shutil.copytree(compiled_path, copy)
    shutil.copyfile(other / "fullmodel" / "modules" / "main.aoti.pt2", copy / "fullmodel" / "modules" / "main.aoti.pt2")
    write_manifest(str(copy))
    with pytest.raises(fm.ParityError, match=r"AOTInductor package of module\(s\) \['main'\].*tolerance 0.0002") as caught:
        check_parity_of(str(copy))
    assert caught.value.stage == "compiled"
    assert check_parity_of(str(compiled_path)) == f"compiled forward within rtol {RTOL:g}"


def test_inspect_the_card_and_verify_say_which_forward_pass_runs(compiled_path):
    result = CliRunner().invoke(main, ["inspect", str(compiled_path)])
    assert result.exit_code == 0, result.output
    assert "compiled: main: AOTInductor package modules/main.aoti.pt2" in result.output
    assert f"for {Target.compiled_for('cpu')}, rtol {RTOL:g}; the package runs here" in result.output
    card = (compiled_path / "MODEL_CARD.md").read_text()
    assert "### Compiled forward pass (AOTInductor)" in card and f"compiled for {Target.compiled_for('cpu')}" in card
    report = verify_model(str(compiled_path))
    assert f"parity (compiled forward within rtol {RTOL:g})" in report.checks


def test_a_server_loads_the_package_golden_checks_it_within_its_tolerance_and_answers_with_it(compiled_path):
    served = loaded(str(compiled_path), ("reviews", "1", "sha256:test", "torch.export"), 20_000)
    assert list(served.model.get_raw_model().module.compiled) == ["main"]
    answer = call(served.app, "/invocations", json.dumps({"dataframe_records": [{"text": t} for t in EXAMPLE_TEXTS]}))
    assert answer.status == 200, answer.body
    got = pd.DataFrame(answer.json()["predictions"])[list(golden_outputs(compiled_path).columns)]
    assert compare_outputs(golden_outputs(compiled_path), got, rel_tol=RTOL) == []


def test_compiling_torchscript_is_refused_naming_the_way_out(text_model, tmp_path):
    with pytest.raises(fm.ConfigError, match="module 'main' is TorchScript. Pass the plain nn.Module"):
        fm.save_model(text_model, str(tmp_path / "m"), input_example=EXAMPLE_TEXTS, compile="aoti")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("options, message", [
    ({"compile": "tvm"}, "compile='tvm' is not a compiler"),
    ({"compile": "aoti", "compile_rtol": 0}, "compile_rtol must be a number between 0 and 1, got 0"),
    ({"compile": "aoti", "compile_rtol": True}, "compile_rtol must be a number between 0 and 1, got True"),
])
def test_bad_compile_options_are_refused_before_anything_is_written(spm_path, tmp_path, options, message):
    with pytest.raises(fm.ConfigError, match=message):
        fm.save_model(eager_model(spm_path), str(tmp_path / "m"), input_example=EXAMPLE_TEXTS, **options)
    assert not (tmp_path / "m").exists()


def test_a_missing_cpp_compiler_is_a_config_error_naming_it(tmp_path):
    # torch reads the compiler's name from CXX when it is imported: a fresh process.
    script = textwrap.dedent("""
        import torch, mlflow_fullmodel as fm
        from sample_steps import BagOfIds, ParseIds
        model = fm.FullModel([ParseIds()], BagOfIds(vocab_size=8, classes=2))
        try:
            fm.save_model(model, "model", input_example=["1 2 3"], compile="aoti")
        except fm.ConfigError as error:
            print("ConfigError:", error)
    """)
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "CXX": "no-such-c++", "PYTHONPATH": tests}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.stdout.startswith("ConfigError: compile='aoti' builds native code with a C++ compiler"), \
        result.stdout + result.stderr
    assert "'no-such-c++'" in result.stdout and "apt-get install g++" in result.stdout
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
def test_a_generation_model_compiles_each_of_its_modules_and_decodes_and_streams_as_its_portable_programs(tmp_path):
    from test_decoding import MarkovDecoder, parse_ids, random_table

    net = MarkovDecoder(random_table()).eval()

    class Encode(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, src: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.net.encode(src, lengths)

    class DecodeStep(Encode):
        def forward(self, tokens: torch.Tensor, state: torch.Tensor, memory: torch.Tensor,
                    src_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.net.decode_step(tokens, state, memory, src_mask)

    model = fm.FullModel(
        preprocess=[parse_ids()], postprocess=[best_candidate()], module={"encoder": Encode(), "decoder": DecodeStep()},
        forward=fm.BeamSearch(encoder="encoder", decoder="decoder", beam_size=fm.Param(3, minimum=1, maximum=8)),
    )
    sources = ["4 5 6", "5 4", "6 6 6 4 5"]
    fm.save_model(model, str(tmp_path / "model"), input_example=sources, compile="aoti")  # parity: both halves
    compiled = fm.load_model(str(tmp_path / "model"))
    portable = fm.load_model(str(tmp_path / "model"), compiled=False)
    assert sorted(compiled.module.compiled) == ["decoder", "encoder"] and portable.module.compiled == {}
    for params in ({}, {"beam_size": 1}):
        assert compare_outputs(portable.predict(sources + ["4"], params), compiled.predict(sources + ["4"], params),
                               rel_tol=1e-4) == []
    streamed = list(compiled.predict_stream(["4 5 6"]))
    assert len(streamed) > 1 and streamed[-1]["ids"] == portable.predict(["4 5 6"])["ids"][0]


@fm.transform
def best_candidate(candidates: list) -> dict:
    """The best hypothesis of a decoding strategy: its ids as text, and its score."""
    ids, score = candidates[0]
    return {"ids": " ".join(map(str, ids)), "score": float(score)}
