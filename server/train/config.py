"""Training configuration: one frozen dataclass, a full preset and a CPU smoke preset."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from server.model.config import ModelConfig

TestSuites = Literal["train", "exclude"]


@dataclass(frozen=True)
class TrainConfig:
    # model (Mamba2; see model_config)
    d_model: int = 320
    n_layer: int = 5
    d_state: int = 64
    headdim: int = 64
    expand: int = 2
    chunk_size: int = 64
    vocab_size: int = 4096
    # data
    seq_len: int = 512
    batch_size: int = 32
    heldout_fraction: float = 0.05
    valid_fraction: float = 0.03
    test_suites: TestSuites = "train"  # test-suite files: extra training data, or left out
    library_repeats: int = 1  # times each library file appears in the training stream
    max_files: int | None = None  # smoke runs: first N files of each split
    max_file_bytes: int | None = None  # smoke runs: only files up to this size
    # optimisation
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_steps: int = 700  # the demo model's schedule (chosen by validation bpb; see its card)
    time_budget_s: float = 540.0  # wall clock for the whole run, from process start
    reserve_s: float = 45.0  # kept back from the budget for evaluation, samples and saving
    eval_every: int = 100  # steps between validation passes (the best one is kept)
    seed: int = 0
    device: str = "auto"  # auto: cuda if available
    smoke: bool = False

    def __post_init__(self) -> None:
        if self.seq_len < 8 or self.batch_size < 1:
            raise ValueError("seq_len must be >= 8 and batch_size >= 1")
        if not 0 < self.heldout_fraction + self.valid_fraction < 0.5:
            raise ValueError("held-out + validation fractions must lie in (0, 0.5)")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("lr must be > 0 and min_lr_ratio in [0, 1]")
        if self.test_suites not in ("train", "exclude"):
            raise ValueError(f"test_suites must be 'train' or 'exclude', got {self.test_suites!r}")
        if self.time_budget_s <= self.reserve_s:
            raise ValueError("time_budget_s must exceed reserve_s")

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            arch="mamba2",
            d_model=self.d_model,
            n_layer=self.n_layer,
            vocab_size=self.vocab_size,
            d_state=self.d_state,
            headdim=self.headdim,
            expand=self.expand,
            chunk_size=self.chunk_size,
            tie_embeddings=True,
        )

    def with_(self, **changes: Any) -> TrainConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def smoke_config(**overrides: Any) -> TrainConfig:
    """A few seconds on CPU: a tiny model, vocabulary and corpus."""
    base = TrainConfig(
        d_model=64,
        n_layer=2,
        d_state=16,
        headdim=16,
        chunk_size=16,
        vocab_size=512,
        seq_len=64,
        batch_size=4,
        test_suites="exclude",
        max_files=8,
        max_file_bytes=6_000,
        lr=3e-3,
        warmup_steps=2,
        max_steps=8,
        time_budget_s=120.0,
        reserve_s=30.0,
        eval_every=8,
        device="cpu",
        smoke=True,
    )
    return base.with_(**overrides)
