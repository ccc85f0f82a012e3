"""Mamba2's state-space duality (SSD) scan in plain torch: chunked, with an initial state, any length.

Computed in fp32. Shapes: x (b, l, h, p), dt (b, l, h) already softplus'ed, A (h,) negative,
B and C (b, l, g, n), initial state (b, h, p, n). The sequence is padded to a multiple of the
chunk size with dt = 0 and x = 0; such steps neither decay nor feed the state, so the final state
is exact for any length. The same holds for padding a caller adds with dt = 0 (batched rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def segsum(a: Tensor) -> Tensor:
    """out[..., i, j] = sum(a[..., j+1 : i+1]) for i >= j, else -inf. a: (..., t) -> (..., t, t)."""
    t = a.shape[-1]
    rep = a.unsqueeze(-1).expand(*a.shape, t)  # rep[..., i, j] = a[..., i]
    strict = torch.tril(torch.ones(t, t, dtype=torch.bool, device=a.device), diagonal=-1)
    sums = rep.masked_fill(~strict, 0).cumsum(dim=-2)
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool, device=a.device))
    return sums.masked_fill(~causal, float("-inf"))


def ssd_scan(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int, init: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Returns (y (b, l, h, p) without the D skip, final state (b, h, p, n))."""
    y, entering = ssd_scan_states(x, dt, A, B, C, chunk, init)
    return y, entering[:, -1]


def ssd_scan_states(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int, init: Tensor | None
) -> tuple[Tensor, Tensor]:
    """`ssd_scan`, returning the fp32 state entering every chunk instead of the final state:
    (y (b, l, h, p), entering (b, c+1, h, p, n)) for c = ceil(l / chunk) chunks; entering[:, j] is the
    state after the first j*chunk steps, entering[:, -1] the final state."""
    b, length, h, p = x.shape
    n = B.shape[-1]
    if init is None:
        init = x.new_zeros(b, h, p, n, dtype=torch.float32)
    if length == 0:
        return x.new_zeros(b, 0, h, p, dtype=torch.float32), init.float().unsqueeze(1)
    rep = h // B.shape[2]
    Bh = B.float().repeat_interleave(rep, dim=2)  # (b, l, h, n)
    Ch = C.float().repeat_interleave(rep, dim=2)
    pad = (-length) % chunk
    xdt = F.pad(x.float() * dt.float().unsqueeze(-1), (0, 0, 0, 0, 0, pad))
    adt = F.pad(dt.float() * A.float(), (0, 0, 0, pad))  # (b, L, h)
    Bh, Ch = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (Bh, Ch))
    # chunk: (b, c, s, ...) with c chunks of s = chunk steps
    xdt, Bh, Ch = (t.unflatten(1, (-1, chunk)) for t in (xdt, Bh, Ch))
    adt = adt.unflatten(1, (-1, chunk)).permute(0, 3, 1, 2)  # (b, h, c, s)
    acum = adt.cumsum(-1)  # (b, h, c, s)
    # 1. within-chunk outputs (the "attention-like" diagonal blocks)
    decay_in = torch.exp(segsum(adt))  # (b, h, c, s, s)
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Ch, Bh, decay_in, xdt)
    # 2. each chunk's own end state, from its inputs alone
    decay_to_end = torch.exp(acum[..., -1:] - acum)  # (b, h, c, s)
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bh, decay_to_end, xdt)
    # 3. carry states across chunks, starting from the initial state
    states = torch.cat([init.float().unsqueeze(1), chunk_states], dim=1)  # (b, c+1, h, p, n)
    decay_chunks = torch.exp(segsum(F.pad(acum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    entering = torch.einsum("bhzc,bchpn->bzhpn", decay_chunks, states)  # (b, c+1, h, p, n)
    # 4. contribution of the state entering each chunk
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Ch, entering[:, :-1], torch.exp(acum))
    y = (y_diag + y_off).flatten(1, 2)[:, :length]
    return y, entering


def fitted_chunk(length: int, chunk: int) -> int:
    """The chunk size for a scan of `length` steps: `chunk` halved while half still holds them all.
    A sequence shorter than one chunk then does not pay for a padded chunk (the within-chunk work is
    quadratic in its size), and the chunk boundaries stay multiples of the result, so the states at
    multiples of `chunk` are still among the chunk-entering states."""
    while chunk % 2 == 0 and chunk // 2 >= max(length, 1):
        chunk //= 2
    return chunk


def ssd_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """One token. x (b, h, p), dt (b, h), B and C (b, g, n), state (b, h, p, n) fp32.

    Returns (y (b, h, p) without the D skip, new state)."""
    rep = x.shape[1] // B.shape[1]
    Bh = B.float().repeat_interleave(rep, dim=1)  # (b, h, n)
    Ch = C.float().repeat_interleave(rep, dim=1)
    dtf = dt.float()
    decay = torch.exp(dtf * A.float())[:, :, None, None]  # (b, h, 1, 1)
    feed = (dtf.unsqueeze(-1) * x.float()).unsqueeze(-1) * Bh.unsqueeze(2)  # (b, h, p, n)
    new_state = state.float() * decay + feed
    y = torch.einsum("bhpn,bhn->bhp", new_state, Ch)
    return y, new_state
