"""Seeded tiny checkpoints and tokenizers that tests build on disk (no downloads).

- `make_hf_checkpoint`: a transformers Mamba2ForCausalLM / MambaForCausalLM saved with
  `save_pretrained` (the Hugging Face format, optionally sharded).
- `make_state_spaces_checkpoint`: the same weights renamed and written the way state-spaces'
  `MambaLMHeadModel` saves them (`config.json` + `pytorch_model.bin`), with a padded vocab.
- `make_tokenizer`: a byte-level BPE trained on a few strings, with a chat template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def hf_model(
    arch: str = "mamba2",
    *,
    seed: int = 0,
    ngroups: int = 1,
    tie: bool = True,
    vocab: int = 320,
    d_model: int = 32,
    n_layer: int = 2,
    chunk_size: int = 8,
) -> Any:
    """A seeded transformers model; random non-trivial dt/A/D so the recurrence matters."""
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    if arch == "mamba2":
        cfg = Mamba2Config(
            vocab_size=vocab,
            hidden_size=d_model,
            num_hidden_layers=n_layer,
            state_size=16,
            head_dim=16,
            num_heads=2 * d_model // 16,
            n_groups=ngroups,
            expand=2,
            chunk_size=chunk_size,
            tie_word_embeddings=tie,
            conv_kernel=4,
        )
        model = Mamba2ForCausalLM(cfg)
    else:
        cfg = MambaConfig(
            vocab_size=vocab,
            hidden_size=d_model,
            num_hidden_layers=n_layer,
            state_size=8,
            expand=2,
            tie_word_embeddings=tie,
            conv_kernel=4,
        )
        model = MambaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias", "D")) or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def make_hf_checkpoint(directory: Path, arch: str = "mamba2", *, shard: bool = False, **kw: Any) -> Path:
    model = hf_model(arch, **kw)
    model.save_pretrained(directory, max_shard_size="20KB" if shard else "5GB")
    return directory


def make_state_spaces_checkpoint(
    directory: Path, arch: str = "mamba2", *, pad_multiple: int = 16, **kw: Any
) -> Path:
    """state-spaces layout: `backbone.embedding`, a vocab padded to `pad_multiple`, ssm_cfg."""
    model = hf_model(arch, **kw)
    hf_cfg = model.config
    state = {
        k.replace("backbone.embeddings.", "backbone.embedding."): v.clone()
        for k, v in model.state_dict().items()
    }
    vocab = hf_cfg.vocab_size
    padded = -(-vocab // pad_multiple) * pad_multiple
    emb = torch.zeros(padded, hf_cfg.hidden_size)
    emb[:vocab] = state["backbone.embedding.weight"]
    state["backbone.embedding.weight"] = emb
    if hf_cfg.tie_word_embeddings:
        state["lm_head.weight"] = emb
    else:
        head = torch.zeros(padded, hf_cfg.hidden_size)
        head[:vocab] = state["lm_head.weight"]
        state["lm_head.weight"] = head
    ssm_cfg: dict[str, Any] = {"d_state": hf_cfg.state_size, "d_conv": hf_cfg.conv_kernel, "expand": 2}
    if arch == "mamba2":
        ssm_cfg |= {
            "layer": "Mamba2",
            "headdim": hf_cfg.head_dim,
            "ngroups": hf_cfg.n_groups,
            "chunk_size": hf_cfg.chunk_size,
        }
    config = {
        "d_model": hf_cfg.hidden_size,
        "d_intermediate": 0,
        "n_layer": hf_cfg.num_hidden_layers,
        "vocab_size": vocab,
        "ssm_cfg": ssm_cfg,
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": pad_multiple,
        "tie_embeddings": hf_cfg.tie_word_embeddings,
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    torch.save(state, directory / "pytorch_model.bin")
    return directory


def make_tokenizer(directory: Path, vocab: int = 300) -> Path:
    """Train a tiny byte-level BPE (vocab <= the model's) and save it transformers-loadable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = [
        "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
        "hello world, the quick brown fox jumps over the lazy dog. é ü ß 日本 🙂",
    ] * 20
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    return directory


def make_chat_model_dir(path: Path, seed: int, tok_vocab: int = 300) -> Path:
    """A seeded tiny Mamba2 (vocab 320, chunk 8) with a byte-level tokenizer of `tok_vocab` ids, in `path`."""
    hf_model("mamba2", seed=seed, vocab=320, chunk_size=8).save_pretrained(path)
    make_tokenizer(path, vocab=tok_vocab)
    return path
