"""A plain nn.Module in a FullModel: run as it is in memory, exported with torch.export when saved,
with dynamic batch and sequence dimensions; and modules that never move between devices."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
from sample_steps import LABELS, BagOfIds
from support import EXAMPLE_TEXTS

import mlflow_fullmodel as fm
from mlflow_fullmodel.modules import ModuleSet
from mlflow_fullmodel.transforms import TopK


def plain_model(text_model: fm.FullModel, net: torch.nn.Module | None = None) -> fm.FullModel:
    torch.manual_seed(0)
    return fm.FullModel(
        preprocess=text_model.preprocess,
        module=net if net is not None else BagOfIds(vocab_size=64, classes=len(LABELS)),
        postprocess=[TopK(labels=LABELS, k=len(LABELS))],
        batch_size=4,
    )


class ThresholdBranch(torch.nn.Module):
    """Python control flow on a tensor's value: torch.export cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(64, 2)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        scores = self.embedding(ids).sum(1)
        if scores.sum() > 0:  # refused: a branch on a tensor's value
            return scores
        return -scores


class ItemAsSize(torch.nn.Module):
    """A size taken from a tensor's value with .item()."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(64, 2)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        longest = int(lengths.max().item())  # refused: a size read from a tensor's value
        return self.embedding(ids[:, :longest]).sum(1)


class NumPyInForward(torch.nn.Module):
    """A tensor handed to NumPy: torch.export traces with tensors that hold no data."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(64, 2)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        scores = self.embedding(ids).sum(1)
        return torch.from_numpy(np.tanh(scores.numpy()))  # refused: NumPy on a traced tensor


def refused_line(module: type[torch.nn.Module]) -> tuple[int, str]:
    """The line number and text of the line marked ``# refused`` in ``module.forward``."""
    lines, start = inspect.getsourcelines(module.forward)
    index = next(i for i, line in enumerate(lines) if "# refused" in line)
    return start + index, lines[index].strip()


def test_a_plain_module_predicts_in_memory_and_is_saved_as_one_exported_program(tmp_path, text_model):
    model = plain_model(text_model)
    assert model.module.formats == {"main": "nn.Module"}
    # One row in the input example: the program must still serve batches of every size.
    fm.save_model(model, str(tmp_path / "model"), input_example=EXAMPLE_TEXTS[:1])
    spec = json.loads((tmp_path / "model" / "fullmodel" / "fullmodel.json").read_text())
    assert spec["modules"]["main"]["format"] == "torch.export"
    assert (tmp_path / "model" / "fullmodel" / spec["modules"]["main"]["file"]).suffix == ".pt2"

    loaded = fm.load_model(str(tmp_path / "model"))
    assert loaded.module.formats == {"main": "torch.export"}
    texts = EXAMPLE_TEXTS + ["Superb!", "A long and dull and boring and tedious film, the plot lazy and the script worse"]
    for rows in ([texts[0]], texts[:2], texts):
        pd.testing.assert_frame_equal(loaded.predict(rows), model.predict(rows), rtol=1e-5)


def test_a_module_torch_export_cannot_trace_is_named_with_the_construct_and_the_way_out(tmp_path, text_model):
    with pytest.raises(fm.ConfigError) as caught:
        fm.save_model(plain_model(text_model, ThresholdBranch()), str(tmp_path / "model"), input_example=EXAMPLE_TEXTS)
    message = str(caught.value)
    assert "torch.export could not export module 'main' (ThresholdBranch)" in message
    assert "data-dependent" in message.lower()
    assert "fm.script(net)" in message
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("module", [ThresholdBranch, ItemAsSize, NumPyInForward])
def test_a_construct_torch_export_refuses_is_named_by_its_file_and_line_in_one_line(tmp_path, text_model, capfd, module):
    line, text = refused_line(module)
    with pytest.raises(fm.ConfigError) as caught:
        fm.save_model(plain_model(text_model, module()), str(tmp_path / "model"), input_example=EXAMPLE_TEXTS)
    message = str(caught.value)
    assert f"test_export.py:{line} `{text}`" in message, message
    assert "\n" not in message and f"({module.__name__})" in message and "fm.script(net)" in message
    # torch's notes for its developers (the partial graph it prints, its log warnings) stay out of the terminal.
    out, err = capfd.readouterr()
    assert "def forward" not in out + err and "symbolic_shapes" not in err and "torch" not in out, err[-2000:]


def test_a_refusal_shows_the_user_only_its_one_line_message_naming_the_modules_own_file(tmp_path):
    # In a process of its own: torch's log handlers write to the stderr they found at import,
    # which no capture fixture sees.
    (tmp_path / "helpers.py").write_text("def positive(x):\n    return bool(x.sum() > 0)\n")
    script = tmp_path / "net.py"
    script.write_text(textwrap.dedent("""
        import torch
        from helpers import positive
        from mlflow_fullmodel.export import export_module

        class Net(torch.nn.Module):
            def forward(self, x):
                if x.sum() > 0:
                    return x
                return -x

        class ViaHelper(torch.nn.Module):
            def forward(self, x):
                return x if positive(x) else -x

        for net in (Net(), ViaHelper()):
            try:
                export_module("main", net, (torch.ones(2, 3),), {})
            except Exception as error:
                print(error)
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr[-3000:]
    direct, via_helper = result.stdout.splitlines()
    assert "(Net) at " in direct and "net.py:8 `if x.sum() > 0:`" in direct, direct
    # The construct is in another file of the user's: the message names the line of the module's
    # own file that leads there.
    assert "(ViaHelper) at " in via_helper and "net.py:14 `return x if positive(x) else -x`" in via_helper, via_helper


def test_a_plain_module_needs_an_input_example_to_be_exported(tmp_path, text_model):
    with pytest.raises(fm.ConfigError, match="exported with torch.export from the input_example"):
        fm.save_model(plain_model(text_model), str(tmp_path / "model"), check_parity=False)


def test_runnable_copies_a_module_to_another_device_and_the_original_stays(text_model):
    net = BagOfIds(vocab_size=64, classes=len(LABELS))
    program = torch.export.export(net.eval(), (torch.ones(2, 5, dtype=torch.long), torch.tensor([5, 3])))
    modules = ModuleSet({"plain": net, "exported": program})
    meta = torch.device("meta")
    for name in modules:
        on_meta = modules.runnable(name, meta)
        assert {p.device for p in on_meta.parameters()} == {meta}
    assert {p.device.type for p in net.parameters()} == {"cpu"}
    assert {t.device.type for t in program.state_dict.values()} == {"cpu"}
    # On the device the weights are on already: no copy.
    assert modules.runnable("plain", torch.device("cpu")) is net


def test_to_gives_a_model_whose_device_copy_leaves_the_original_answering(text_model):
    model = plain_model(text_model)
    expected = model.predict(EXAMPLE_TEXTS)
    moved = model.to("cpu")
    moved.module.runnable("main", torch.device("meta"))  # what a CUDA device would do, without one
    pd.testing.assert_frame_equal(model.predict(EXAMPLE_TEXTS), expected)
    scripted = fm.script(BagOfIds(vocab_size=64, classes=len(LABELS)))
    weights = [p.clone() for p in scripted.parameters()]
    with pytest.raises(fm.DeviceError, match=r"^Module 'main' \(torchscript\) cannot be moved to meta: "):
        ModuleSet({"main": scripted}).runnable("main", torch.device("meta"))  # TorchScript cannot go to meta
    assert all(p.device.type == "cpu" and torch.equal(p, w) for p, w in zip(scripted.parameters(), weights))


class LastState(torch.nn.Module):
    """A GRU over the ids, read at each text's last token: torch.export fixes a GRU's sequence length."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(64, 8)
        self.gru = torch.nn.GRU(8, 8, batch_first=True)
        self.out = torch.nn.Linear(8, len(LABELS))

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        states, _ = self.gru(self.embedding(ids))
        last = (lengths - 1).view(-1, 1, 1).expand(-1, 1, states.shape[2])
        return self.out(states.gather(1, last).squeeze(1))


def test_a_recurrent_module_needs_one_padded_length_and_the_error_says_so(tmp_path, text_model):
    torch.manual_seed(0)
    with pytest.raises(fm.ConfigError, match=r"fails on one row of the input example alone.*PadCollate\(length=\.\.\.\)"):
        fm.save_model(plain_model(text_model, LastState()), str(tmp_path / "refused"), input_example=EXAMPLE_TEXTS)

    model = fm.FullModel(text_model.preprocess, LastState(), [TopK(labels=LABELS, k=len(LABELS))],
                         collate=fm.PadCollate(length=32), batch_size=4)
    fm.save_model(model, str(tmp_path / "model"), input_example=EXAMPLE_TEXTS)
    loaded = fm.load_model(str(tmp_path / "model"))
    pd.testing.assert_frame_equal(loaded.predict(EXAMPLE_TEXTS[:1]), model.predict(EXAMPLE_TEXTS[:1]), rtol=1e-5)
    with pytest.raises(fm.InputError, match="pads to length=2; truncate"):
        fm.FullModel(text_model.preprocess, LastState(), collate=fm.PadCollate(length=2)).predict(EXAMPLE_TEXTS)


class DroppingBag(BagOfIds):
    """BagOfIds with dropout before the output layer: training and eval mode answer differently."""

    def __init__(self, vocab_size: int, classes: int) -> None:
        super().__init__(vocab_size, classes)
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = (torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]).float()
        pooled = (self.embedding(ids) * mask[..., None]).sum(1) / lengths[:, None].float()
        return self.out(self.dropout(pooled))


def test_predicting_and_saving_leave_a_network_in_training_mode_as_it_was(text_model, tmp_path):
    torch.manual_seed(0)
    net = DroppingBag(vocab_size=64, classes=len(LABELS))
    net.train()
    model = fm.FullModel(preprocess=text_model.preprocess, module=net, postprocess=text_model.postprocess)
    first, second = model.predict(EXAMPLE_TEXTS), model.predict(EXAMPLE_TEXTS)
    assert net.training and net.dropout.training  # the caller's network, as the caller left it
    pd.testing.assert_frame_equal(first, second)  # no dropout while predicting
    net.eval()
    pd.testing.assert_frame_equal(model.predict(EXAMPLE_TEXTS), first)
    net.train()
    fm.save_model(model, str(tmp_path / "model"), input_example=EXAMPLE_TEXTS)
    assert net.training
    pd.testing.assert_frame_equal(fm.load_model(str(tmp_path / "model")).predict(EXAMPLE_TEXTS), first)
