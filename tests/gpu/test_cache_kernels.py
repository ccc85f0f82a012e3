"""The Triton codec kernels (`cache.triton_codec`) against the torch codec ops: bit-identical encode and
decode for fp8 / fp16 / bf16, vectors of length 3, 64 and 128, edge rows (zero, exact powers of two, 1e30,
1e-30, subnormal), strided live-slot views in and out; and the cache fetching into slot views on CUDA."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("triton")

from cache import CacheConfig, StateCache
from cache.codec import ScaledCodec, make_codec
from cache.layout import BlockLayout
from cache.triton_codec import decode, encode

pytestmark = pytest.mark.gpu
CODECS = {"fp8": (torch.float8_e4m3fn, 8, 448.0), "fp16": (torch.float16, 15, 65504.0)}
CODECS["bf16"] = (torch.bfloat16, 15, 3.0e38)
SLOTS, SLOT = 3, 1


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that comparisons are exact (signed zeros included) for every dtype."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    diff = (_bits(a) != _bits(b)).nonzero()
    assert diff.numel() == 0, f"{diff.shape[0]} elements differ, first at {diff[0].tolist()}"


def _make_state(shape: tuple[int, ...], seed: int, subnormal: bool = False) -> torch.Tensor:
    """fp32 `shape` (..., D) on the host, with edge rows: zero, amax an exact power of two (positive and
    negative), huge (1e30), tiny (1e-30), magnitudes spread over 1e-6..1e3, optionally subnormal rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    rows = x.view(-1, shape[-1])  # a view: edits land in x
    rows *= torch.logspace(-6, 3, rows.shape[0]).view(-1, 1)[torch.randperm(rows.shape[0], generator=g)]
    rows[0::9] = 0.0
    rows[1::9] = rows[1::9].clamp(-1.9, 1.9)
    rows[1::9, 0] = 2.0  # amax exactly 2
    rows[2::9] = rows[2::9].clamp(-0.24, 0.24)
    rows[2::9, -1] = -0.25  # amax exactly 2**-2, negative
    rows[3::9] *= 1e30
    rows[4::9] *= 1e-30
    if subnormal:
        rows[5::9] *= 1e-39  # amax around 1e-39 (normal boundary 1.2e-38): mostly subnormal elements
        rows[6::9] *= 1e-44  # a few ulps of the smallest subnormal: the exponent clamp decides the scale
    return x


def _in_pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A pool (L, SLOTS, ...) of junk on the device with `x` in slot SLOT; returns (pool, slot view)."""
    pool = torch.randn(x.shape[0], SLOTS, *x.shape[1:], device="cuda").to(x.dtype)
    pool[:, SLOT] = x
    view = pool[:, SLOT]
    assert not view.is_contiguous()
    return pool, view


def _torch_encode(x: torch.Tensor, codec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: the codec's torch ops (`fused=False`)."""
    eager = make_codec(codec)
    assert eager.storage_dtype == CODECS[codec][0]
    data = torch.empty(x.shape, dtype=eager.storage_dtype, device=x.device)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    eager.encode_into(x, data, scale)
    return data, scale


def _triton_encode(x: torch.Tensor, codec: str) -> tuple[torch.Tensor, torch.Tensor]:
    dtype, top, limit = CODECS[codec]
    data = torch.empty(x.shape, dtype=dtype, device=x.device)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    assert encode(x, data, scale, top, limit), "the kernel declined a supported layout"
    return data, scale


def _skip_without_fp8(codec: str) -> None:
    if codec == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 kernels need sm_89+")


SHAPES = {3: (2, 40, 3), 64: (2, 3, 10, 64), 128: (2, 4, 9, 128)}  # conv-like and ssm-like states


@pytest.mark.parametrize("d", [3, 64, 128])
@pytest.mark.parametrize("codec", ["fp8", "fp16", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["x_fp32", "x_bf16"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "slot_view"])
def test_encode_is_bit_identical_to_torch(d: int, codec: str, dtype: torch.dtype, strided: bool) -> None:
    _skip_without_fp8(codec)
    x = _make_state(SHAPES[d], seed=d).to(dtype).cuda()
    if strided:
        _, x = _in_pool(x)
    want_data, want_scale = _torch_encode(x, codec)
    data, scale = _triton_encode(x, codec)
    _assert_same_bits(scale, want_scale)
    _assert_same_bits(data, want_data)


@pytest.mark.parametrize("d", [3, 64, 128])
@pytest.mark.parametrize("codec", ["fp8", "fp16", "bf16"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["out_fp32", "out_bf16"])
def test_decode_into_a_slot_view_is_bit_identical_to_torch(
    d: int, codec: str, out_dtype: torch.dtype
) -> None:
    _skip_without_fp8(codec)
    data, scale = _torch_encode(_make_state(SHAPES[d], seed=10 + d).cuda(), codec)
    want = torch.empty(data.shape, dtype=out_dtype, device="cuda")
    make_codec(codec).decode_into(data, scale, want)
    pool, view = _in_pool(torch.zeros(data.shape, dtype=out_dtype, device="cuda"))
    before = pool.clone()
    assert decode(data, scale, view), "the kernel declined a supported layout"
    _assert_same_bits(view, want)
    for slot in range(SLOTS):
        if slot != SLOT:
            _assert_same_bits(pool[:, slot], before[:, slot])


@pytest.mark.parametrize("codec", ["fp8", "fp16", "bf16"])
def test_subnormal_rows_match_the_host_reference(codec: str) -> None:
    """Subnormal amax (frexp of a subnormal, the exponent clamp, subnormal scales) against torch on the host,
    where frexp and the division are exact IEEE operations."""
    _skip_without_fp8(codec)
    x = _make_state(SHAPES[128], seed=3, subnormal=True)
    want_data, want_scale = _torch_encode(x, codec)
    data, scale = _triton_encode(x.cuda(), codec)
    _assert_same_bits(scale.cpu(), want_scale)
    _assert_same_bits(data.cpu(), want_data)
    out = torch.empty(x.shape, device="cuda")
    assert decode(data, scale, out)
    _assert_same_bits(out.cpu(), want_data.float() * want_scale.unsqueeze(-1))


def test_unsupported_layouts_are_declined_and_the_codec_still_works() -> None:
    codec = make_codec("fp16", fused=True)
    x = _make_state((2, 8, 16), seed=4).cuda()
    data, scale = _torch_encode(x, "fp16")
    out_t = torch.empty(2, 16, 8, device="cuda").transpose(1, 2)  # last dim not contiguous
    assert not decode(data, scale, out_t)
    codec.decode_into(data, scale, out_t)  # torch ops
    _assert_same_bits(out_t.contiguous(), data.float() * scale.unsqueeze(-1))
    assert not decode(data.cpu(), scale, out_t)  # mixed devices


@pytest.mark.parametrize("codec", ["fp8", "fp16", "bf16"])
def test_fused_codec_uses_the_kernels_and_matches_eager(codec: str) -> None:
    _skip_without_fp8(codec)
    fused = make_codec(codec, fused=True)
    assert isinstance(fused, ScaledCodec)
    x = _make_state(SHAPES[128], seed=5).cuda()
    _, view = _in_pool(x)
    data, scale = _torch_encode(x, codec)
    got_data = torch.empty_like(data)
    got_scale = torch.empty_like(scale)
    fused.encode_into(view, got_data, got_scale)
    out = torch.empty_like(x)
    fused.decode_into(got_data, got_scale, out)
    assert fused._fused and fused._kernels is not None, "fell back to torch ops"
    _assert_same_bits(got_data, data)
    _assert_same_bits(out, data.float() * scale.unsqueeze(-1))


def _cache_spec() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {"conv": ((2, 40, 3), torch.bfloat16), "ssm": ((2, 4, 9, 128), torch.float32)}


@pytest.mark.parametrize("tier", ["hot", "cold"])
def test_cache_fetch_into_slot_views_on_cuda(tier: str) -> None:
    spec = _cache_spec()
    kw: dict[str, Any] = {"hot_bytes": 1 << 22, "cold_bytes": 1 << 22, "device": "cuda"}
    if tier == "cold":
        kw["hot_bytes"] = 0
    cache = StateCache(CacheConfig(**kw), spec)
    state = {name: _make_state(shape, seed=6).to(dtype).cuda() for name, (shape, dtype) in spec.items()}
    assert cache.capture("ns", "s", [1, 2, 3], state, reason="x")
    lease = cache.lookup("ns", "s", [1, 2, 3, 4])
    assert lease is not None and lease.tier == tier
    fresh = cache.fetch(lease)
    pools = {
        name: _in_pool(torch.zeros(shape, dtype=dtype, device="cuda"))
        for name, (shape, dtype) in spec.items()
    }
    before = {name: pool.clone() for name, (pool, _) in pools.items()}
    cache.fetch(lease, out={name: view for name, (_, view) in pools.items()})
    cache.release(lease)
    torch.cuda.synchronize()
    for name, (pool, view) in pools.items():
        _assert_same_bits(view, fresh[name])
        for slot in range(SLOTS):
            if slot != SLOT:
                _assert_same_bits(pool[:, slot], before[name][:, slot])
    err = (fresh["ssm"] - state["ssm"]).abs()
    assert (err <= 2**-4 * state["ssm"].abs().amax(-1, keepdim=True)).all()  # fp8 / fp16 bound, not garbage


@pytest.mark.parametrize("codec", ["fp8", "fp16"])
def test_stacked_states_encode_into_block_rows_as_one_by_one(codec: str) -> None:
    """`capture_many`'s path: n stacked states encoded by one launch per state tensor into n blocks of a run
    (strided data and scale outputs) give each block the bytes the torch ops give it alone."""
    _skip_without_fp8(codec)
    spec = _cache_spec()
    fused, eager = BlockLayout(spec, make_codec(codec, fused=True)), BlockLayout(spec, make_codec(codec))
    states = [
        {
            name: _make_state(shape, seed=7 * i + k).to(dtype).cuda()
            for k, (name, (shape, dtype)) in enumerate(spec.items())
        }
        for i in range(3)
    ]
    stacked = {name: torch.stack([s[name] for s in states]) for name in spec}
    rows = torch.zeros((3, fused.block_bytes), dtype=torch.uint8, device="cuda")
    _, top, limit = CODECS[codec]
    for name, (data, scale) in fused.rows_views(rows).items():
        assert not data.is_contiguous()  # n blocks apart
        assert encode(stacked[name], data, scale, top, limit), "the kernel declined stacked outputs"
    for i, state in enumerate(states):
        want = torch.zeros(eager.block_bytes, dtype=torch.uint8, device="cuda")
        eager.encode_into(state, want)
        _assert_same_bits(rows[i], want)
    again = torch.zeros_like(rows)
    fused.encode_rows(stacked, again)
    _assert_same_bits(again, rows)
