"""The live state pool: one (conv, ssm) state per slot and layer, preallocated.

    conv: (n_layer, slots, c, k-1)  model dtype  the last k-1 inputs of the depthwise conv
    ssm:  (n_layer, slots, h, p, n) ssm dtype    Mamba2 (h heads of dim p, state size n)
          (n_layer, slots, e, n)    ssm dtype    Mamba1

The ssm dtype is fp32 (the default) or bf16 (`--state-dtype bf16`): the mixers compute in fp32 from
either, and the runner rounds the new state to the pool's dtype when it stores it. bf16 halves the
ssm state's bytes per slot, which a large decode batch reads and writes every step.

`spare` slots past `slots` are the runner's own scratch (a forked prefill row's state, `gpu_runner`): no
request holds them and `check_slot` refuses them.

A slot's state as named tensors (what the cache stores) drops the slot axis:
    "conv": (n_layer, c, k-1), "ssm": (n_layer, h, p, n) or (n_layer, e, n).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from server.model.config import ModelConfig
from server.model.defaults import to_device

StateSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]
STATE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the live ssm dtypes


class StatePool:
    def __init__(
        self,
        cfg: ModelConfig,
        slots: int,
        dtype: torch.dtype,
        device: torch.device,
        ssm_dtype: torch.dtype = torch.float32,
        spare: int = 0,
    ) -> None:
        if ssm_dtype not in STATE_DTYPES.values():
            raise ValueError(f"the live ssm state is fp32 or bf16, not {ssm_dtype}")
        self.cfg, self.slots = cfg, slots
        rows = slots + spare
        self.conv = torch.zeros(cfg.n_layer, rows, cfg.conv_dim, cfg.d_conv - 1, dtype=dtype, device=device)
        self.ssm = torch.zeros(cfg.n_layer, rows, *cfg.ssm_state_shape(), dtype=ssm_dtype, device=device)

    def spec(self) -> StateSpec:
        return {
            "conv": ((self.conv.shape[0], *self.conv.shape[2:]), self.conv.dtype),
            "ssm": ((self.ssm.shape[0], *self.ssm.shape[2:]), self.ssm.dtype),
        }

    def check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.slots:
            raise IndexError(f"slot {slot} out of range [0, {self.slots})")

    def views(self, slot: int) -> dict[str, Tensor]:
        """One slot's state as views into the pool (no copy; writing them writes the slot):
        "conv": (n_layer, c, k-1) with strides (slots*c*(k-1), k-1, 1), "ssm": (n_layer, ...) likewise."""
        self.check_slot(slot)
        return self._row(slot)

    def spare_views(self, i: int = 0) -> dict[str, Tensor]:
        """Spare slot i's state as views, like `views` (the runner's own scratch; no request holds it)."""
        if not 0 <= i < self.conv.shape[1] - self.slots:
            raise IndexError(f"spare slot {i} out of range [0, {self.conv.shape[1] - self.slots})")
        return self._row(self.slots + i)

    def _row(self, row: int) -> dict[str, Tensor]:
        return {"conv": self.conv[:, row], "ssm": self.ssm[:, row]}

    def read(self, slot: int) -> dict[str, Tensor]:
        """A copy of one slot's state."""
        return {name: view.clone() for name, view in self.views(slot).items()}

    def write(self, slot: int, state: Mapping[str, Tensor]) -> None:
        self.check_slot(slot)
        spec = self.spec()
        if set(state) != set(spec):
            raise ValueError(f"state names {sorted(state)} != {sorted(spec)}")
        for name, tensor in state.items():
            if tuple(tensor.shape) != spec[name][0]:
                raise ValueError(f"state {name!r} has shape {tuple(tensor.shape)}, expected {spec[name][0]}")
        for name, view in self.views(slot).items():
            view.copy_(state[name], non_blocking=True)

    def reset(self, slot: int) -> None:
        self.check_slot(slot)
        self.conv[:, slot].zero_()
        self.ssm[:, slot].zero_()

    def reset_many(self, slots: Sequence[int]) -> None:
        """Zero several slots: one kernel a state whatever their number (a burst admits dozens of fresh
        requests at once, and `reset` is two launches a slot)."""
        for slot in slots:
            self.check_slot(slot)
        if len(slots) == 1:
            self.reset(slots[0])  # views: no index to copy
        elif slots:
            index = to_device(torch.tensor(list(slots), dtype=torch.long), self.conv.device)
            self.conv.index_fill_(1, index, 0)
            self.ssm.index_fill_(1, index, 0)
