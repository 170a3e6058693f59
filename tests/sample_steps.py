"""Steps and a network used by the tests, kept free of test-framework imports: the flavor captures
this module as source into the models the tests save, the way it captures a user's project."""

from __future__ import annotations

import random
import time
from functools import cached_property
from pathlib import Path

import sentencepiece
import torch

import mlflow_fullmodel as fm

WORDS = {
    "pos": "good great amazing wonderful superb delightful brilliant".split(),
    "neg": "bad awful boring terrible dull dreadful poor".split(),
    "neutral": "film movie plot actor scene story director".split(),
}
LABELS = ["neg", "pos"]


class Normalize(fm.Transform):
    """Lower-case and collapse whitespace."""

    def __call__(self, text: str) -> str:
        return " ".join(text.lower().split())


class Repeat(fm.Transform):
    """Repeat the text ``times`` times; ``times`` is usually a runtime parameter."""

    def __init__(self, times: int | fm.Param = 1) -> None:
        pass

    def __call__(self, text: str, times: int | None = None) -> str:
        count = times if times is not None else self.times
        return " ".join([text] * count)


class Pause(fm.Transform):
    """Wait ``seconds`` on a text that starts with "[pause]" (and drop the mark): a request that
    stays in flight as long as a test needs."""

    MARK = "[pause]"

    def __init__(self, seconds: float) -> None:
        pass

    def __call__(self, text: str) -> str:
        if not text.startswith(self.MARK):
            return text
        time.sleep(self.seconds)
        return text[len(self.MARK):]


class Synonyms(fm.Transform):
    """Replace words by the ``word=synonym`` lines of the ``.txt`` files in a folder: a step whose
    artifact is a folder."""

    def __init__(self, folder: fm.Artifact) -> None:
        pass

    @cached_property
    def _table(self) -> dict[str, str]:
        root = Path(self.folder)
        lines = [line for path in sorted(root.glob("*.txt")) for line in path.read_text().splitlines()]
        return dict(line.split("=", 1) for line in lines if "=" in line)

    def __call__(self, text: str) -> str:
        return " ".join(self._table.get(word, word) for word in text.split())


class BagOfIds(torch.nn.Module):
    """Mean of token embeddings over the unpadded positions, then a linear layer."""

    def __init__(self, vocab_size: int, classes: int, dim: int = 16) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab_size, dim)
        self.out = torch.nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = (torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]).float()
        pooled = (self.embedding(ids) * mask[..., None]).sum(1) / lengths[:, None].float()
        return self.out(pooled)


def corpus(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Labelled synthetic reviews: 3 to 12 words, mostly of the label's sentiment."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(LABELS)
        words = [rng.choice(WORDS[label] if rng.random() < 0.6 else WORDS["neutral"]) for _ in range(rng.randint(3, 12))]
        rows.append((" ".join(words).capitalize() + "!", label))
    return rows


def train_tokenizer(texts: list[str], prefix: str, vocab_size: int = 64) -> str:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=vocab_size, pad_id=0, unk_id=1,
        bos_id=2, eos_id=3, hard_vocab_limit=False, minloglevel=2,
    )
    return prefix + ".model"


class ParseIds(fm.Transform):
    """"3 14 15" -> tensor([3, 14, 15]): lets a test send ids the network cannot embed."""

    def __call__(self, text: str) -> torch.Tensor:
        return torch.tensor([int(token) for token in text.split()], dtype=torch.long)


class ScaledCall(fm.CallModule):
    """Call the module and multiply its scores by ``scale``: a forward step with a runtime param."""

    def __init__(self, module: str = "main", scale: float | fm.Param = 1.0) -> None:
        pass

    def __call__(self, modules, batch, device, scale: float = 1.0):
        return super().__call__(modules, batch, device) * scale


class StepDataset(torch.utils.data.Dataset):
    """Texts through a step, one item each: what a DataLoader worker gets a pickled copy of."""

    def __init__(self, step: fm.Transform, texts: list[str]) -> None:
        self.step, self.texts = step, texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.step(self.texts[index])
