"""`diff` and `inspect` of real saved models whose network or folder artifact changed: the network's
parameters (added, removed, reshaped, recast, values) and the files inside a folder artifact."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from sample_steps import LABELS, BagOfIds, Normalize, Synonyms

import mlflow_fullmodel as fm
from mlflow_fullmodel.cli import main
from mlflow_fullmodel.storage.integrity import folder_digest
from mlflow_fullmodel.transforms import SentencePieceEncode, TopK

TEXTS = ["What a GREAT film!", "Dull  and boring.", "The plot was superb, the actor wonderful"]
#: BagOfIds(64, 2): a 64 x 16 embedding, a 16 -> 2 linear layer.
PARAMETERS = 64 * 16 + 2 * 16 + 2


class SharperBag(BagOfIds):
    """BagOfIds with its scores doubled: other code, the same parameters."""

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = (torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]).float()
        pooled = (self.embedding(ids) * mask[..., None]).sum(1) / lengths[:, None].float()
        return self.out(pooled) * 2


class DeeperBag(BagOfIds):
    """BagOfIds with a hidden layer between the pooling and the output layer."""

    def __init__(self, vocab_size: int, classes: int, dim: int = 16) -> None:
        super().__init__(vocab_size, classes, dim)
        self.hidden = torch.nn.Linear(dim, dim)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = (torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]).float()
        pooled = (self.embedding(ids) * mask[..., None]).sum(1) / lengths[:, None].float()
        return self.out(torch.relu(self.hidden(pooled)))


def saved(path: Path, spm_path: str, module, *preprocess: fm.Transform) -> str:
    model = fm.FullModel(
        preprocess=[Normalize(), *preprocess, SentencePieceEncode(fm.Artifact(spm_path), max_length=32)],
        module=module,
        postprocess=[TopK(labels=LABELS, k=fm.Param(1, minimum=1, maximum=len(LABELS)))],
        batch_size=2,
    )
    fm.save_model(model, str(path), input_example=TEXTS)
    return str(path)


@pytest.fixture(scope="module")
def networks(tmp_path_factory, spm_path) -> dict[str, tuple[str, dict[str, torch.Tensor]]]:
    """One network saved as TorchScript in six versions, each with its state_dict: the base, one
    weight tensor nudged, a layer added, a smaller embedding (two shapes changed), cast to float64,
    and other code around the same weights."""
    torch.manual_seed(0)
    base = BagOfIds(64, len(LABELS))
    nudged = copy.deepcopy(base)
    with torch.no_grad():
        nudged.out.weight[1, 3] += 0.1
        nudged.out.weight[0, 0] -= 0.2  # the larger change is a decrease: an absolute difference
    deeper = DeeperBag(64, len(LABELS))
    deeper.load_state_dict(base.state_dict(), strict=False)  # the layers they share are the same
    torch.manual_seed(1)
    narrower = BagOfIds(64, len(LABELS), dim=8)
    recoded = SharperBag(64, len(LABELS))
    recoded.load_state_dict(base.state_dict())
    variants = {"base": base, "nudged": nudged, "deeper": deeper, "narrower": narrower,
                "float64": copy.deepcopy(base).double(), "recoded": recoded}
    folder = tmp_path_factory.mktemp("networks")
    return {name: (saved(folder / name, spm_path, fm.script(net)), net.state_dict()) for name, net in variants.items()}


def diff_json(a: str, b: str) -> dict:
    result = CliRunner().invoke(main, ["diff", a, b, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def diff_text(a: str, b: str) -> str:
    result = CliRunner().invoke(main, ["diff", a, b])
    assert result.exit_code == 0, result.output
    return result.output


def test_diff_of_a_network_with_one_changed_weight_reports_its_largest_absolute_difference(networks):
    (base, before), (nudged, after) = networks["base"], networks["nudged"]
    expected = (after["out.weight"] - before["out.weight"]).abs().max().item()
    assert expected != 0.2  # float32 rounding: the value is the one the two tensors give, not the nudge
    differences = diff_json(base, nudged)
    assert differences["tensors"] == {"main": {
        "parameters": [PARAMETERS, PARAMETERS], "added": [], "removed": [], "changed": [],
        "values": {"compared": 3, "changed": 1, "max_abs_diff": expected, "name": "out.weight"},
    }}
    assert "main: parameter count 1058 (unchanged)" in differences["modules"]
    text = diff_text(base, nudged)
    assert (f"  main: values changed in 1 of 3 same-shaped tensors, largest absolute difference {expected:.6g} "
            "(out.weight)\n") in text
    assert "tensors:" not in text  # the data behind the lines is for --json only


def test_diff_of_a_network_with_an_added_layer_lists_its_parameters_and_the_new_count(networks):
    base, deeper = networks["base"][0], networks["deeper"][0]
    change = diff_json(base, deeper)["tensors"]["main"]
    assert change["added"] == [
        {"name": "hidden.weight", "kind": "parameter", "shape": [16, 16], "dtype": "float32"},
        {"name": "hidden.bias", "kind": "parameter", "shape": [16], "dtype": "float32"},
    ]
    assert change["parameters"] == [PARAMETERS, PARAMETERS + 16 * 16 + 16]
    assert (change["removed"], change["changed"]) == ([], [])
    assert change["values"] == {"compared": 3, "changed": 0, "max_abs_diff": None, "name": None}
    text = diff_text(base, deeper)
    assert "  main: parameter count 1058 -> 1330\n" in text
    assert "  main: added parameter hidden.weight [16, 16] float32\n" in text
    assert "  main: removed parameter hidden.weight [16, 16] float32\n" in diff_text(deeper, base)


def test_diff_of_a_network_with_a_smaller_embedding_names_the_changed_shapes(networks):
    (base, before), (narrower, after) = networks["base"], networks["narrower"]
    change = diff_json(base, narrower)["tensors"]["main"]
    assert change["changed"] == [
        {"name": "embedding.weight", "kind": "parameter", "shape": [[64, 16], [64, 8]], "dtype": ["float32"] * 2},
        {"name": "out.weight", "kind": "parameter", "shape": [[2, 16], [2, 8]], "dtype": ["float32"] * 2},
    ]
    assert change["parameters"] == [PARAMETERS, 64 * 8 + 2 * 8 + 2]
    # Only out.bias keeps its shape; its values (another initialisation) are compared.
    bias = (after["out.bias"] - before["out.bias"]).abs().max().item()
    assert change["values"] == {"compared": 1, "changed": 1, "max_abs_diff": bias, "name": "out.bias"}
    assert "  main: parameter embedding.weight: shape [64, 16] -> [64, 8]\n" in diff_text(base, narrower)


def test_diff_of_a_network_cast_to_float64_names_the_dtypes_and_no_value_change(networks):
    change = diff_json(networks["base"][0], networks["float64"][0])["tensors"]["main"]
    assert [(t["name"], t["dtype"], t["shape"][0] == t["shape"][1]) for t in change["changed"]] == [
        ("embedding.weight", ["float32", "float64"], True), ("out.weight", ["float32", "float64"], True),
        ("out.bias", ["float32", "float64"], True),
    ]
    assert change["values"]["changed"] == 0  # float32 values are exact in float64
    assert "  main: parameter out.bias: dtype float32 -> float64\n" in diff_text(networks["base"][0],
                                                                                  networks["float64"][0])


def test_diff_of_two_exported_programs_compares_their_weights(tmp_path, spm_path):
    torch.manual_seed(0)
    base = BagOfIds(64, len(LABELS))
    nudged = copy.deepcopy(base)
    with torch.no_grad():
        nudged.embedding.weight[5] *= 2
    a, b = saved(tmp_path / "a", spm_path, base), saved(tmp_path / "b", spm_path, nudged)  # exported at save
    expected = (nudged.embedding.weight - base.embedding.weight).abs().max().item()
    differences = diff_json(a, b)
    change = differences["tensors"]["main"]
    assert change["parameters"] == [PARAMETERS, PARAMETERS] and change["changed"] == []
    assert change["values"] == {"compared": 3, "changed": 1, "max_abs_diff": expected, "name": "embedding.weight"}
    facts = json.loads(CliRunner().invoke(main, ["inspect", a, "--json"]).stdout)
    assert facts["modules"][0]["format"] == "torch.export"


def test_diff_of_a_network_whose_code_changed_but_not_its_weights_says_so(networks):
    text = diff_text(networks["base"][0], networks["recoded"][0])
    assert "  main: parameter count 1058 (unchanged)\n  main: parameters and buffers unchanged (3 tensors)\n" in text


def test_a_module_archive_that_cannot_be_read_is_one_line_of_the_diff(networks, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(networks["base"][0], broken)
    (broken / "fullmodel" / "modules" / "main.pt").write_bytes(b"not a TorchScript archive")
    result = CliRunner().invoke(main, ["diff", networks["base"][0], str(broken)])
    assert result.exit_code == 0, result.output
    assert "  main: parameters cannot be compared: RuntimeError: " in result.output
    assert "  main: size " in result.output and "Traceback" not in result.output


def test_a_file_changed_at_the_same_size_inside_a_folder_artifact_shows_in_diff_and_inspect(tmp_path, spm_path):
    lexicon = tmp_path / "lexicon"
    lexicon.mkdir()
    (lexicon / "films.txt").write_text("film=movie\n")
    (lexicon / "moods.txt").write_text("dull=flat\n")
    torch.manual_seed(0)
    net = fm.script(BagOfIds(64, len(LABELS)))
    a = saved(tmp_path / "a", spm_path, net, Synonyms(fm.Artifact(lexicon)))
    (lexicon / "moods.txt").write_text("dull=drab\n")  # the same size
    b = saved(tmp_path / "b", spm_path, net, Synonyms(fm.Artifact(lexicon)))

    facts = [json.loads(CliRunner().invoke(main, ["inspect", m, "--json"]).stdout) for m in (a, b)]
    (before,), (after,) = ([x for x in f["artifacts"] if x["argument"] == "folder"] for f in facts)
    assert before["size"] == after["size"] and before["sha256"] != after["sha256"]
    assert sorted(before["files"]) == ["films.txt", "moods.txt"]
    assert before["files"]["films.txt"] == after["files"]["films.txt"]
    # The folder digest is the one its manifest entries give.
    manifest = json.loads(Path(b, "MANIFEST.json").read_text())["files"]
    prefix = f"fullmodel/{after['path']}/"
    assert after["sha256"] == folder_digest({k[len(prefix):]: v for k, v in manifest.items() if k.startswith(prefix)})
    text = CliRunner().invoke(main, ["inspect", b]).output
    assert f"{after['path']} ({after['size']} bytes, a folder of 2 files, digest {after['sha256'][:16]})" in text

    artifacts = diff_json(a, b)["artifacts"]
    assert artifacts == [
        f'preprocess[1] folder: sha256 "{before["sha256"]}" -> "{after["sha256"]}"',
        "preprocess[1] folder: files changed: moods.txt",
    ]
