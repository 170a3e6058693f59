"""The benchmark's subjects: a text classifier in two sizes, its tokenizer, mixed-length text, the
fullmodel version and the PythonModel a user would write by hand."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import sentencepiece
import torch

import mlflow_fullmodel as fm
from mlflow_fullmodel.modules import quiet_torch_jit
from mlflow_fullmodel.transforms import SentencePieceEncode, TopK

LABELS = ["negative", "neutral", "positive"]
VOCABULARY = 2000
WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "su", "te", "ra", "po", "ne", "vi", "zu")
         for b in ("ba", "de", "fi", "go", "hu", "ja", "ke", "lu", "mo", "ni", "pa", "ri", "so", "tu")]


class Tiny(torch.nn.Module):
    """EmbeddingBag + Linear: the forward pass costs little, so overheads show."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.EmbeddingBag(VOCABULARY, 64, mode="sum")
        self.out = torch.nn.Linear(64, len(LABELS))

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        real = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).float()
        return self.out(self.embedding(ids, per_sample_weights=real / lengths[:, None].float()))


class Medium(torch.nn.Module):
    """A 4-layer Transformer encoder, d_model 256, mean-pooled over the real tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(VOCABULARY, 256)
        layer = torch.nn.TransformerEncoderLayer(256, 4, 512, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.out = torch.nn.Linear(256, len(LABELS))

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        padding = torch.arange(ids.shape[1])[None, :] >= lengths[:, None]
        hidden = self.encoder(self.embedding(ids), src_key_padding_mask=padding)
        keep = (~padding).float()[..., None]
        return self.out((hidden * keep).sum(1) / lengths[:, None].float())


def texts(n: int, seed: int = 0) -> list[str]:
    """Mixed-length text: 3 to 120 words."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 120))) for _ in range(n)]


@dataclass
class Subject:
    name: str
    folder: str
    spm: str
    net: torch.jit.ScriptModule

    @property
    def fullmodel(self) -> fm.FullModel:
        return fm.FullModel(
            preprocess=[SentencePieceEncode(fm.Artifact(self.spm), max_length=256)],
            module=self.net,
            postprocess=[TopK(labels=LABELS, k=fm.Param(1, minimum=1, maximum=len(LABELS)))],
            batch_size=32,
        )


def build(name: str, folder: str) -> Subject:
    """Train the tokenizer, script the network (random weights: speed does not depend on them)."""
    os.makedirs(folder, exist_ok=True)
    prefix = os.path.join(folder, "spm")
    if not os.path.exists(prefix + ".model"):
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(texts(3000, seed=1)), model_prefix=prefix, vocab_size=VOCABULARY,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3, hard_vocab_limit=False, minloglevel=2, num_threads=1,
        )
    torch.manual_seed(0)
    net = fm.script({"tiny": Tiny, "medium": Medium}[name]())
    with quiet_torch_jit():
        torch.jit.save(net, os.path.join(folder, f"{name}.pt"))
    return Subject(name, folder, prefix + ".model", net)
