"""The training loop: AdamW, linear warm-up then cosine decay, bf16 autocast on GPU, a wall-clock cap.

After warm-up, the cosine's progress is the larger of the step fraction (steps done over
`max_steps`) and the time fraction (time since warm-up over what is left until the deadline, the
time budget less `reserve_s` for evaluation and saving). Training ends when progress reaches 1, so
the learning rate has always decayed fully by the deadline, however fast the GPU is (two runs that
share one GPU slow each other down unevenly). With a budget too large to bind, `max_steps` alone
sets the schedule and a run is repeatable step for step. Validation bits per byte are measured
every `eval_every` steps and at the end; the best weights are kept.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from server.model.lm import MambaLM
from server.train.config import TrainConfig
from server.train.data import BatchSampler, EvalSet
from server.train.evaluate import evaluate_bpb

log = logging.getLogger(__name__)
LOG_EVERY = 50


@dataclass(frozen=True)
class TrainResult:
    steps: int
    tokens_seen: int
    train_seconds: float
    final_train_loss: float  # nats per token, mean over the steps since the last log line
    best_valid_bpb: float
    best_step: int


def lr_at(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warm-up over warmup_steps, then cosine from lr (progress 0) to lr * min_lr_ratio (1)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """Weight decay on the projection matrices only (not embeddings, norms, conv, A, D, dt)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        is_matrix = p.dim() == 2 and "embedding" not in name
        (decay if is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def _loss(model: MambaLM, inputs: Tensor, targets: Tensor, device: torch.device) -> Tensor:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(inputs)  # (b, l, v)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class Trainer:
    def __init__(
        self, model: MambaLM, cfg: TrainConfig, sampler: BatchSampler, valid: EvalSet, deadline: float
    ) -> None:
        self.model, self.cfg, self.sampler, self.valid = model, cfg, sampler, valid
        self.device = next(model.parameters()).device
        self.opt = make_optimizer(model, cfg, self.device)
        self.deadline = deadline  # time.monotonic() by which training stops
        self.warm_end = math.nan  # time.monotonic() when warm-up ended
        self.best_bpb, self.best_step = math.inf, -1
        self.best_state: dict[str, Tensor] = {}
        self.loss_sum = torch.zeros((), device=self.device)  # since the last log line, on device
        self.loss_count = 0
        self.last_loss = math.nan

    def progress(self, step: int) -> float:
        """Cosine progress in [0, 1]: the larger of the step and time fractions after warm-up."""
        w = self.cfg.warmup_steps
        if step < w:
            return 0.0
        if math.isnan(self.warm_end):
            self.warm_end = time.monotonic()
        by_steps = (step + 1 - w) / max(1, self.cfg.max_steps - w)  # 1 at the last step
        span = max(1e-9, self.deadline - self.warm_end)
        return max(by_steps, (time.monotonic() - self.warm_end) / span)

    def _step(self, step: int) -> float:
        progress = self.progress(step)
        for group in self.opt.param_groups:
            group["lr"] = lr_at(step, progress, self.cfg)
        inputs, targets = self.sampler.next()
        loss = _loss(self.model, inputs, targets, self.device)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.loss_sum += loss.detach()
        self.loss_count += 1
        return progress

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _validate(self, step: int) -> None:
        bpb = evaluate_bpb(self.model, self.valid, self.device)
        log.info("step %d: valid %.4f bpb", step, bpb)
        if bpb < self.best_bpb:
            self.best_bpb, self.best_step = bpb, step
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _log(self, step: int, progress: float) -> None:
        if self.loss_count:
            self.last_loss = float(self.loss_sum) / self.loss_count
            self.loss_sum.zero_()
            self.loss_count = 0
        lr = lr_at(step, progress, self.cfg)
        log.info("step %d (%.1f%%) loss %.4f lr %.2e", step, 100 * progress, self.last_loss, lr)

    def run(self) -> TrainResult:
        self.model.train()
        begun = time.monotonic()
        step, progress = 0, 0.0
        while step < self.cfg.max_steps and progress < 1.0 and time.monotonic() < self.deadline:
            progress = self._step(step)
            step += 1
            if step % LOG_EVERY == 0:
                self._log(step, progress)
            if step % self.cfg.eval_every == 0:
                self._validate(step)
        self._log(step, progress)
        self._sync()
        seconds = time.monotonic() - begun
        if step % self.cfg.eval_every or not self.best_state:
            self._validate(step)
        self.model.load_state_dict(self.best_state)
        tokens = step * self.cfg.tokens_per_step
        return TrainResult(step, tokens, seconds, self.last_loss, self.best_bpb, self.best_step)
