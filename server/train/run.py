"""One training run end to end: corpus, tokenizer, data, model, training, evaluation, export, card."""

from __future__ import annotations

import bisect
import io
import itertools
import json
import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import tokenizers
import torch
from tokenizers import Tokenizer

from server.model.defaults import pick_device
from server.model.export import save_pretrained
from server.model.lm import MambaLM
from server.train import corpus as corpus_mod
from server.train.card import TRAIN_REPORT, write_card
from server.train.chat_examples import build_chat_examples
from server.train.config import TrainConfig
from server.train.data import BatchSampler, build_eval_set, build_train_stream, doc_texts
from server.train.evaluate import evaluate_bpb, text_bpb
from server.train.init import init_weights
from server.train.loop import Trainer
from server.train.samples import card_samples
from server.train.tokenizer import END, ENDOFTEXT, load_tokenizer, save_tokenizer, special_id, train_tokenizer

log = logging.getLogger(__name__)
SLICE_PIECES, SLICE_PIECE_BYTES = 24, 1024


@dataclass(frozen=True)
class RunPaths:
    out_dir: Path  # the model directory
    slice_out: Path | None = None  # where to write the held-out slice for the tests
    tokenizer_dir: Path | None = None  # reuse this tokenizer instead of training one


def heldout_slice(docs: Sequence[corpus_mod.Document]) -> str:
    """A systematic sample of the held-out text: SLICE_PIECES blocks of whole lines, each at least
    SLICE_PIECE_BYTES long, starting at evenly spaced byte offsets of the held-out files joined in
    path order. The same for every training seed."""
    lines = [line for doc in docs for line in io.StringIO(doc.text, newline="").readlines()]
    ends = list(itertools.accumulate(len(line.encode("utf-8")) for line in lines))  # byte offset after line i
    pieces = []
    for i in range(SLICE_PIECES):
        j = bisect.bisect_left(ends, i * ends[-1] // SLICE_PIECES)
        piece = ""
        while j < len(lines) and len(piece.encode("utf-8")) < SLICE_PIECE_BYTES:
            piece, j = piece + lines[j], j + 1
        pieces.append(piece)
    return "".join(pieces)


def _corpus_info(c: corpus_mod.Corpus, n_examples: int) -> dict[str, Any]:
    b = corpus_mod.total_bytes
    return {
        "stdlib": str(corpus_mod.stdlib_root()),
        "train_files": len(c.train),
        "train_bytes": b(c.train),
        "valid_files": len(c.valid),
        "valid_bytes": b(c.valid),
        "heldout_files": len(c.heldout),
        "heldout_bytes": b(c.heldout),
        "test_files": len(c.tests),
        "test_bytes": b(c.tests),
        "chat_examples": n_examples,
    }


def _model_info(model: MambaLM) -> dict[str, Any]:
    m = model.cfg
    keys = (
        "d_model",
        "n_layer",
        "vocab_size",
        "d_state",
        "d_conv",
        "d_inner",
        "expand",
        "headdim",
        "chunk_size",
    )
    info: dict[str, Any] = {k: getattr(m, k) for k in keys}
    info["nheads"] = m.nheads
    state_bytes = m.n_layer * (m.conv_dim * (m.d_conv - 1) + m.nheads * m.headdim * m.d_state) * 4
    return {"model_config": info, "state_bytes": state_bytes}


def _tokenizer(c: corpus_mod.Corpus, cfg: TrainConfig, paths: RunPaths) -> Tokenizer:
    if paths.tokenizer_dir is not None:
        return load_tokenizer(paths.tokenizer_dir)
    started = time.monotonic()
    tok = train_tokenizer(doc_texts(c.train), cfg.vocab_size)
    log.info("tokenizer: %d tokens in %.1f s", tok.get_vocab_size(), time.monotonic() - started)
    return tok


def _save(model: MambaLM, tok: Tokenizer, cfg: TrainConfig, out: Path) -> int:
    """Model (fp16), tokenizer, generation config; returns the weights file's size in bytes."""
    save_pretrained(model, out, fmt="hf", dtype=torch.float16)
    save_tokenizer(tok, out)
    ids = {"bos_token_id": special_id(tok, ENDOFTEXT), "pad_token_id": special_id(tok, ENDOFTEXT)}
    ids["eos_token_id"] = [special_id(tok, END), special_id(tok, ENDOFTEXT)]  # type: ignore[assignment]
    config = json.loads((out / "config.json").read_text()) | ids
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")
    return (out / "model.safetensors").stat().st_size


def train_and_export(cfg: TrainConfig, paths: RunPaths, command: str, started: float) -> dict[str, Any]:
    """Returns the report also written to out_dir/train_report.json (and rendered as README.md)."""
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)  # fails at once if CUDA is asked for and missing
    with_tests = cfg.test_suites == "train"
    c = corpus_mod.load_corpus(
        cfg.heldout_fraction, cfg.valid_fraction, with_tests, None, cfg.max_files, cfg.max_file_bytes
    )
    tok = _tokenizer(c, cfg, paths)
    examples = build_chat_examples(c.train)
    stream, stats = build_train_stream(tok, c, examples, cfg.seed, cfg.library_repeats)
    log.info("stream: %d tokens (%s); %d chat examples", stream.numel(), stats, len(examples))
    valid = build_eval_set(tok, doc_texts(c.valid), cfg.seq_len)
    model = MambaLM(cfg.model_config())
    init_weights(model, cfg.seed)
    model.to(device)
    sampler = BatchSampler(stream, cfg.seq_len, cfg.batch_size, cfg.seed, device)
    deadline = started + cfg.time_budget_s - cfg.reserve_s
    result = Trainer(model, cfg, sampler, valid, deadline).run()
    model.half().float()  # evaluate exactly what is shipped: fp16-rounded weights
    slice_text = heldout_slice(c.heldout)
    report: dict[str, Any] = {
        "seed": cfg.seed,
        "command": command,
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "tokenizers_version": tokenizers.__version__,
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.machine()})",
        "config": cfg.to_dict(),
        "corpus": _corpus_info(c, len(examples)),
        "stream": asdict(stats),
        "result": asdict(result),
        "parameters": sum(p.numel() for p in model.parameters()),
        "embedding_parameters": model.backbone.embedding.weight.numel(),
        "heldout_bpb": evaluate_bpb(model, build_eval_set(tok, doc_texts(c.heldout), cfg.seq_len), device),
        "valid_bpb": evaluate_bpb(model, valid, device),
        "slice_bpb": text_bpb(model, tok, [slice_text], cfg.seq_len, device),
        "heldout_bytes": corpus_mod.total_bytes(c.heldout),
        "slice_bytes": len(slice_text.encode("utf-8")),
        "samples": [asdict(s) for s in card_samples(model, tok, 8 if cfg.smoke else 96)],
        "weights_dtype": "fp16",
    } | _model_info(model)
    report["weights_bytes"] = _save(model, tok, cfg, paths.out_dir)
    report["total_seconds"] = time.monotonic() - started
    (paths.out_dir / TRAIN_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    if paths.slice_out is not None:
        paths.slice_out.parent.mkdir(parents=True, exist_ok=True)
        paths.slice_out.write_text(slice_text, encoding="utf-8")
    write_card(paths.out_dir)
    log.info(
        "held-out %.4f bpb, slice %.4f bpb -> %s", report["heldout_bpb"], report["slice_bpb"], paths.out_dir
    )
    return report
