"""A small encoder-decoder with attention that TorchScript can compile.

Beside ``forward`` (used for training, with teacher forcing), the module exports the two methods
that mlflow-fullmodel's ``GreedySearch`` and ``BeamSearch`` call at inference time::

    encode(src, lengths) -> (memory, state)
    decode_step(tokens, state, memory, src_mask) -> (logits, state)

Every tensor is batch first, so that beam search can reorder hypotheses along the first dimension.
``forward`` is built from ``encode`` and ``decode_step``, so training and serving run the same code.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["DecodeStep", "Encode", "Translator", "entry_points"]


class Translator(nn.Module):
    """A GRU encoder, and a GRU decoder with dot-product attention over the encoder outputs.

    Args:
        source_vocab_size: The source tokenizer's vocabulary size.
        target_vocab_size: The target tokenizer's vocabulary size.
        embedding_dim: The size of a token embedding.
        hidden_dim: The size of the GRU states.
        pad_id: The padding id of both tokenizers; its embeddings stay zero.
    """

    def __init__(
        self,
        source_vocab_size: int,
        target_vocab_size: int,
        embedding_dim: int = 32,
        hidden_dim: int = 64,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        self.source_embedding = nn.Embedding(source_vocab_size, embedding_dim, padding_idx=pad_id)
        self.encoder = nn.GRU(embedding_dim, hidden_dim, batch_first=True)
        self.target_embedding = nn.Embedding(target_vocab_size, embedding_dim, padding_idx=pad_id)
        self.decoder = nn.GRUCell(embedding_dim, hidden_dim)
        self.query = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.combine = nn.Linear(2 * hidden_dim, hidden_dim)
        self.output = nn.Linear(hidden_dim, target_vocab_size)

    @torch.jit.export
    def encode(self, src: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder outputs ``(B, T, hidden)`` and the decoder's first state ``(B, hidden)``.

        The GRU runs left to right over right-padded ids, so the outputs at real positions never
        see the padding: a source decodes the same alone or in a padded batch.
        """
        memory, _ = self.encoder(self.source_embedding(src))
        last = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, memory.size(2))
        return memory, memory.gather(1, last).squeeze(1)

    @torch.jit.export
    def decode_step(self, tokens: Tensor, state: Tensor, memory: Tensor, src_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Next-token logits ``(N, target_vocab)`` after ``tokens`` ``(N,)``, and the new state."""
        state = self.decoder(self.target_embedding(tokens), state)
        scores = torch.bmm(memory, self.query(state).unsqueeze(2)).squeeze(2)  # (N, T)
        weights = torch.softmax(scores.masked_fill(~src_mask, float("-inf")), dim=1)
        context = torch.bmm(weights.unsqueeze(1), memory).squeeze(1)
        hidden = torch.tanh(self.combine(torch.cat([state, context], dim=1)))
        return self.output(hidden), state

    def forward(self, src: Tensor, lengths: Tensor, target_in: Tensor) -> Tensor:
        """Teacher forcing: logits ``(B, L, target_vocab)`` for ``target_in`` ``(B, L)``, which
        starts with BOS."""
        memory, state = self.encode(src, lengths)
        src_mask = torch.arange(src.size(1), device=src.device).unsqueeze(0) < lengths.unsqueeze(1)
        logits = []
        for step in range(target_in.size(1)):
            step_logits, state = self.decode_step(target_in[:, step], state, memory, src_mask)
            logits.append(step_logits)
        return torch.stack(logits, dim=1)


class Encode(nn.Module):
    """``Translator.encode`` as a module of its own: torch.export exports one entry point per module."""

    def __init__(self, net: Translator) -> None:
        super().__init__()
        self.net = net

    def forward(self, src: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        return self.net.encode(src, lengths)


class DecodeStep(nn.Module):
    """``Translator.decode_step`` as a module of its own."""

    def __init__(self, net: Translator) -> None:
        super().__init__()
        self.net = net

    def forward(self, tokens: Tensor, state: Tensor, memory: Tensor, src_mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.net.decode_step(tokens, state, memory, src_mask)


def entry_points(net: Translator) -> dict[str, nn.Module]:
    """The modules a FullModel holds for ``--module-format export``: log_model exports each from the
    calls beam search makes on the input example."""
    return {"encoder": Encode(net.eval()), "decoder": DecodeStep(net)}
