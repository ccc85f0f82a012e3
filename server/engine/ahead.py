"""Decode ahead: the next decode step is launched before this step's tokens reach the host.

On CUDA a runner call returns once its work is queued. Without decode ahead a step is serial: the GPU
decodes, the host waits for the sampled tokens, then does the step's bookkeeping (stop rules,
detokenization, events, captures), the event loop delivers the events and plans the next step, and only
then is the next decode launched; the GPU idles through all the host work. With it, right after sampling
step N (its tokens still on the device), the worker launches step N+1's decode of the same rows, fed with
those tokens, and only then copies them to the host. The GPU computes step N+1 while the host finishes
step N; the next `execute` takes the logits for the rows that still decode (`Ahead.take`) and decodes the
rest (rows that were not fed, e.g. an `ignore_eos` row that sampled EOS) as usual. A row whose prompt ended
in step N sampled its first token there and is fed like the others.

A fed row's state has consumed its last sampled token, so which rows are fed is decided before that token
is known on the host, in a way the host can repeat once it is:
- a row that reaches `max_tokens` with this token is not fed (the host knows that beforehand);
- a row whose token is a stop id of any row of the batch is not fed: the runner masks it on the device
  (`decode(skip=...)`). A request that ends on EOS or a stop token id therefore keeps the state of its
  tokens but the last, as without decode ahead, and its finish checkpoint is the same;
- every other row is fed. One that then ends (a stop string) or is aborted wasted a row of a batch that
  ran anyway; its finish checkpoint covers all its output tokens (`Seq.state_output(fed_last=True)`). Its
  slot is reset or restored before reuse by work queued behind the fed step on the same stream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from server.engine.request import Seq
from server.model.defaults import to_device
from server.model.runner import ModelRunner

log = logging.getLogger(__name__)


@dataclass
class Ahead:
    """A decode step computed ahead: `index` maps each fed row to its row of `logits` (in flight)."""

    index: dict[Seq, int]
    logits: Tensor  # (rows launched, v) fp32; unfed rows' are meaningless

    def fed(self, seq: Seq) -> bool:
        return seq in self.index

    def take(self, decodes: list[Seq]) -> tuple[list[Seq], Tensor | None, list[Seq]]:
        """Split a step's decoding rows: (rows computed ahead, their logits in that order, rows to decode)."""
        early = [s for s in decodes if s in self.index]
        late = [s for s in decodes if s not in self.index]
        if not early:
            return [], None, late
        rows = [self.index[s] for s in early]
        if rows == list(range(self.logits.shape[0])):
            return early, self.logits, late
        picked = self.logits.index_select(0, to_device(torch.tensor(rows), self.logits.device))
        return early, picked, late


@dataclass
class Launched:
    """A decode step launched ahead, before its rows' tokens are known on the host."""

    rows: list[Seq]
    slots: list[int]  # -1: not fed (the row ends with this token)
    skip: frozenset[int]  # token ids whose rows the device left unfed
    logits: Tensor

    def resolve(self, tokens: list[int]) -> Ahead:
        """The rows fed, once the tokens they were fed are on the host."""
        fed = {
            seq: r
            for r, (seq, slot, token) in enumerate(zip(self.rows, self.slots, tokens, strict=True))
            if slot >= 0 and token not in self.skip
        }
        return Ahead(fed, self.logits)


class DecodeAhead:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self._skip: tuple[frozenset[int], Tensor] | None = None  # the last stop-id set, on the device
        self._stops: tuple[tuple[Seq, ...], frozenset[int]] | None = None  # the last rows' stop ids, by rows

    def launch(self, rows: list[Seq], tokens: Tensor) -> Launched | None:
        """Queue the next decode of `rows`, fed with their sampled `tokens` (b,) on the device; None when no
        row goes on or the launch failed (logged: the rows are then decoded as usual next step)."""
        slots = [s.slot if _goes_on(s) else -1 for s in rows]
        if all(s < 0 for s in slots):
            return None
        skip = self._stop_ids(rows)
        try:
            logits = self.runner.decode(tokens, slots, skip=self._skip_ids(skip) if skip else None)
        except Exception:
            log.exception("decode ahead failed to launch; decoding next step as usual")
            return None
        return Launched(rows, slots, skip, logits)

    def _stop_ids(self, rows: list[Seq]) -> frozenset[int]:
        """Every row's stop ids; the last step's again when its rows are the same requests (`Seq` compares by
        identity): a union of 64 sets each step was a fair share of the worker's time at 64 streams."""
        key = tuple(rows)
        if self._stops is None or self._stops[0] != key:
            self._stops = (key, frozenset[int]().union(*(s.stop_ids for s in rows)))
        return self._stops[1]

    def _skip_ids(self, skip: frozenset[int]) -> Tensor:
        if self._skip is None or self._skip[0] != skip:
            ids = torch.tensor(sorted(skip), dtype=torch.long)
            self._skip = (skip, to_device(ids, self.runner.device))
        return self._skip[1]


def _goes_on(seq: Seq) -> bool:
    """Whether the row may need another step after the token being sampled (not aborted, below max_tokens)."""
    return not seq.aborted and len(seq.output) + 1 < seq.req.params.max_tokens
