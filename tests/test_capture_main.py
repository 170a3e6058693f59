"""Steps defined in ``__main__``: a training script, or a notebook whose cells live only in memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

import mlflow_fullmodel as fm
from mlflow_fullmodel.storage.capture import MAIN_MODULE

TRAINING_SCRIPT = textwrap.dedent('''
    import functools, json, re, sys
    import sentencepiece
    import torch
    import mlflow_fullmodel as fm
    from mlflow_fullmodel.transforms import SentencePieceEncode, TopK

    STOPWORDS = {"the", "a", "was"}
    PUNCTUATION = re.compile(r"[^a-z ]+")

    def strip_stopwords(text, stopwords):
        return " ".join(w for w in text.split() if w not in stopwords)

    class Clean(fm.Transform):
        def __init__(self, lowercase: bool = True):
            pass

        @functools.cached_property
        def _stopwords(self):  # the only reader of STOPWORDS
            return frozenset(STOPWORDS)

        def __call__(self, text):
            text = text.lower() if self.lowercase else text
            return strip_stopwords(PUNCTUATION.sub(" ", text), self._stopwords)

    @fm.transform
    def clip(text, max_words: int = 6):
        return " ".join(text.split()[:max_words])

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.EmbeddingBag(64, 2, padding_idx=0)  # the mean skips the padding

        def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            return self.embedding(ids)

    if __name__ == "__main__":
        out = sys.argv[1]
        texts = ["the film was great", "a dull plot", "superb acting", "boring and bad"] * 20
        sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=out + "/spm",
            vocab_size=40, hard_vocab_limit=False, minloglevel=2, pad_id=0, unk_id=1, bos_id=2, eos_id=3)
        torch.manual_seed(0)
        model = fm.FullModel(
            preprocess=[Clean(), clip(max_words=4), SentencePieceEncode(fm.Artifact(out + "/spm.model"))],
            module=torch.jit.script(Net()),
            postprocess=[TopK(labels=["neg", "pos"], k=fm.Param(1))],
        )
        examples = ["The film WAS great!!", "A dull, dull plot; boring and bad and long"]
        fm.save_model(model, out + "/model", input_example=examples)
        print(json.dumps(model.predict(examples, params={"k": 2}).to_dict(orient="list")))
''')


def run_training(code: str, folder: Path, as_notebook: bool) -> dict:
    if as_notebook:
        # What IPython does: cell sources live in linecache under a pseudo file name.
        runner = textwrap.dedent("""
            import linecache, sys
            source = sys.stdin.read()
            name = "<ipython-input-1-0123456789ab>"
            linecache.cache[name] = (len(source), None, source.splitlines(True), name)
            exec(compile(source, name, "exec"), sys.modules["__main__"].__dict__)
        """)
        command = [sys.executable, "-c", runner, str(folder)]
        result = subprocess.run(command, input=code, capture_output=True, text=True, timeout=300, cwd=folder)
    else:
        script = folder / "train.py"
        script.write_text(code)
        result = subprocess.run([sys.executable, str(script), str(folder)], capture_output=True, text=True,
                                timeout=300, cwd=folder)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("as_notebook", [False, True], ids=["script", "notebook"])
def test_a_step_defined_in_main_is_captured_with_the_globals_it_uses(tmp_path, as_notebook):
    expected = run_training(TRAINING_SCRIPT, tmp_path, as_notebook)
    source = (tmp_path / "model" / "fullmodel" / "code" / f"{MAIN_MODULE}.py").read_text()
    assert "class Clean(fm.Transform)" in source and "def strip_stopwords" in source and "def clip" in source
    assert "STOPWORDS = {" in source and "import re" in source and "import mlflow_fullmodel as fm" in source
    assert "PUNCTUATION = re.compile" in source  # not a literal: its top-level statement is re-run
    assert "class Net" not in source  # the network travels as TorchScript, not as source
    assert source.index("def strip_stopwords") < source.index("class Clean")

    loaded = fm.load_model(str(tmp_path / "model"))
    result = loaded.predict(["The film WAS great!!", "A dull, dull plot; boring and bad and long"], params={"k": 2})
    pd.testing.assert_frame_equal(result, pd.DataFrame(expected))


def test_a_main_step_using_a_global_that_is_not_source_is_refused_naming_it(tmp_path):
    # Made inside the main block, not by a top-level statement that could be saved and re-run.
    code = TRAINING_SCRIPT.replace('STOPWORDS = {"the", "a", "was"}', "")
    code = code.replace("out = sys.argv[1]", "out = sys.argv[1]\n    STOPWORDS = {object()}")
    script = tmp_path / "train.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    # Read in a cached_property only.
    assert "Clean (defined in __main__) uses the global 'STOPWORDS' of type set" in result.stderr
    assert "Pass it to the constructor instead" in result.stderr
    assert not (tmp_path / "model").exists()
