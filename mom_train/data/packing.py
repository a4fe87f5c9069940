"""Pack documents into fixed-size micro-batches [1, T] with `cu_seqlens` at every document (segment) start.

T = micro_batch_size * seq_len. Documents are laid end to end; a document cut by the batch edge continues in
the next batch as a new segment, so an over-long document is split across batches, never dropped. Labels
follow the Hugging Face convention (labels = input_ids; the model shifts and masks across cu_seqlens), with
-100 where a document says so (MQAR: everything but the answers) and on the padding of a final flush.
Fixed-length data (one seq_len document each) is the same code path: cu_seqlens = [0, L, 2L, ...].
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100


@dataclass
class Batch:
    """One micro-batch on CPU.

    input_ids:  long [1, T]
    labels:     long [1, T], equals input_ids where the token is a target, -100 elsewhere
    cu_seqlens: int32 [N+1], segment starts, first 0, last T
    stats:      cumulative counts of the stream (documents, tokens, skipped records, epoch, ...)
    """
    input_ids: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    stats: dict = field(default_factory=dict)


class Packer:
    """Accumulates documents and cuts batches of exactly `num_tokens` tokens.

    A document is (tokens int [L], labels int [L] or None = same as tokens, source or None). `pending` holds at
    most the documents not yet emitted plus the unemitted tail of a cut one; it is the packer's whole state.
    A source is a tuple naming where the document came from, its last element the offset of `tokens` in it;
    a cut tail's source has the offset moved past the emitted tokens, so a saved state can name it compactly.
    """

    def __init__(self, num_tokens: int):
        self.num_tokens = num_tokens
        self.pending: list[tuple[torch.Tensor, torch.Tensor | None, tuple | None]] = []
        self.num_pending = 0

    def add(self, tokens: torch.Tensor, labels: torch.Tensor | None = None, source: tuple | None = None) -> None:
        if tokens.numel() == 0:
            return
        self.pending.append((tokens, labels, source))
        self.num_pending += tokens.numel()

    def ready(self) -> bool:
        return self.num_pending >= self.num_tokens

    def pop(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cut one batch: (input_ids long [1, T], labels long [1, T], cu_seqlens int32 [N+1]); needs ready()."""
        assert self.ready(), "pop() needs num_tokens pending tokens; check ready() first"
        ids, labs, lengths = [], [], []
        room = self.num_tokens
        while room:
            tokens, labels, source = self.pending[0]
            take = min(room, tokens.numel())
            ids.append(tokens[:take])
            labs.append((tokens if labels is None else labels)[:take])
            lengths.append(take)
            room -= take
            if take == tokens.numel():
                self.pending.pop(0)
            else:
                # the tail continues as a new segment of the next batch
                self.pending[0] = (tokens[take:], None if labels is None else labels[take:],
                                   None if source is None else (*source[:-1], source[-1] + take))
        self.num_pending -= self.num_tokens
        return self._assemble(ids, labs, lengths)

    def flush(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The leftover as a last batch padded to T with token 0 / label -100 (its own segment); None if empty."""
        if not self.pending:
            return None
        ids = [t for t, _, _ in self.pending]
        labs = [t if lab is None else lab for t, lab, _ in self.pending]
        lengths = [t.numel() for t in ids]
        pad = self.num_tokens - self.num_pending
        if pad:
            ids.append(torch.zeros(pad, dtype=torch.long))
            labs.append(torch.full((pad,), IGNORE_INDEX, dtype=torch.long))
            lengths.append(pad)
        self.pending, self.num_pending = [], 0
        return self._assemble(ids, labs, lengths)

    @staticmethod
    def _assemble(ids: list[torch.Tensor], labs: list[torch.Tensor], lengths: list[int]):
        input_ids = torch.cat([t.long() for t in ids]).unsqueeze(0)  # [1, T]
        labels = torch.cat([t.long() for t in labs]).unsqueeze(0)  # [1, T]
        cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu_seqlens[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
        return input_ids, labels, cu_seqlens

    def state_dict(self) -> dict:
        return {"pending": [(t.clone(), None if lab is None else lab.clone(), src) for t, lab, src in self.pending]}

    def snapshot(self) -> dict:
        """Like state_dict but shares the (never mutated) pending tensors; cheap enough for every batch."""
        return {"pending": list(self.pending)}

    def load_state_dict(self, sd: dict) -> None:
        self.pending = [tuple(entry) if len(entry) == 3 else (*entry, None) for entry in sd["pending"]]
        self.num_pending = sum(t.numel() for t, _, _ in self.pending)
