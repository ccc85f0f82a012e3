"""The sampling inputs of a step's rows, rebuilt only when the rows change.

From one decode step to the next the batch usually holds the same requests in the same order, so their
`SamplingBatch` (per-row parameters copied to the device) and slot indices are the same as the step
before. `RowInputsCache` keys them on the rows themselves (`Seq` objects, compared by identity and held
by the cache, so that no new request can take a finished one's place in the key) and on the tokens each
row may not sample yet (stop tokens before its `min_tokens`, which change as it generates). A step whose
rows match the previous one's costs one tuple comparison instead of a host-to-device copy per field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from server.engine.request import Seq
from server.engine.sampler import SamplingBatch, penalised_rows, to_device


@dataclass(frozen=True)
class RowInputs:
    batch: SamplingBatch
    slots: Tensor  # (b,) int64 on the device: each row's live slot
    penalised: Tensor | None  # (b,) int32 on the device: 1 where the row's token counts matter; None: no row


class RowInputsCache:
    """The last step's `RowInputs`, reused while the rows and their banned tokens stay the same."""

    def __init__(self, device: torch.device, vocab_limit: int) -> None:
        self.device, self.vocab_limit = device, vocab_limit
        self._key: tuple[tuple[Seq, ...], tuple[frozenset[int], ...]] | None = None
        self._inputs: RowInputs | None = None

    def get(self, rows: Sequence[Seq]) -> RowInputs:
        banned = tuple(s.banned_ids(self.vocab_limit) for s in rows)
        key = (tuple(rows), banned)
        if self._inputs is None or key != self._key:
            self._inputs, self._key = self._build(rows, banned), key
        return self._inputs

    def clear(self) -> None:
        self._key = self._inputs = None

    def _build(self, rows: Sequence[Seq], banned: Sequence[frozenset[int]]) -> RowInputs:
        params = [s.req.params for s in rows]
        batch = SamplingBatch.build(params, [s.generator for s in rows], self.device, banned)
        slots = to_device(torch.tensor([s.slot for s in rows], dtype=torch.long), self.device)
        return RowInputs(batch, slots, penalised_rows(batch) if batch.use_penalties else None)
