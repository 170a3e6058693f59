"""A small text classifier that TorchScript can compile: embeddings, mean pooling, an MLP.

``forward(ids, lengths)`` takes right-padded token ids ``(batch, time)`` and each row's number of
real tokens; mlflow-fullmodel's ``PadCollate`` builds both, and passes ``lengths=`` because the
forward method has an argument of that name.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["TextClassifier"]


class TextClassifier(nn.Module):
    """Bag-of-subwords classifier: mean of the token embeddings over the non-padded positions,
    then one hidden layer.

    Args:
        vocab_size: The tokenizer's vocabulary size (sentencepiece ``get_piece_size()``).
        num_classes: The number of labels.
        embedding_dim: The size of a token embedding.
        hidden_dim: The size of the hidden layer.
        dropout: Dropout on the hidden layer while training.
        pad_id: The padding id; its embedding stays zero.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        embedding_dim: int = 64,
        hidden_dim: int = 64,
        dropout: float = 0.1,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=pad_id)
        self.hidden = nn.Linear(embedding_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_dim, num_classes)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """Class scores (logits) of shape ``(batch, num_classes)``."""
        embedded = self.embedding(ids)  # (batch, time, embedding_dim)
        positions = torch.arange(ids.size(1), device=ids.device)
        mask = (positions.unsqueeze(0) < lengths.unsqueeze(1)).to(embedded.dtype).unsqueeze(2)
        counts = lengths.clamp(min=1).to(embedded.dtype).unsqueeze(1)
        pooled = (embedded * mask).sum(dim=1) / counts
        hidden = self.dropout(torch.relu(self.hidden(pooled)))
        return self.output(hidden)
