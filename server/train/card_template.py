"""The model card's text; `card.render_card` fills the fields (str.format)."""

from __future__ import annotations

TEMPLATE = """\
---
license: other
library_name: tssc
pipeline_tag: text-generation
tags: [mamba2, ssm, tiny, python, demo]
---

# tssc demo Mamba2: a tiny Python-stdlib model

The default `--model` of `tssc`: a {params}-parameter Mamba2 language model trained from scratch
by this project on the Python standard library's own source, so the server does something real
offline, on a laptop CPU, with nothing to download. It completes Python code in the standard
library's style and answers chat requests for a function given its signature and docstring. It is
a demo: small, narrow, and often wrong. Do not use its code without reading it.

{summary}

## Model

Mamba2 (state-space duality) blocks from `server.model.lm.MambaLM`, the project's own model code:
RMSNorm, a Mamba2 mixer (in_proj to z, x, B, C and dt; depthwise causal conv of width
{r[model_config][d_conv]}; the SSD scan; gated RMSNorm; out_proj), residual stream in fp32, and a
final RMSNorm; the LM head is tied to the embedding. No attention and no MLP layers.

Why this size: the issue caps `model.safetensors` at 10 MB and asks for useful speed on a 2-core
CPU. At fp16 that allows about 5 M parameters. A {cfg[vocab_size]}-token vocabulary keeps the tied
embedding at {r[embedding_parameters]:,} parameters, and the rest goes to depth:
{r[model_config][n_layer]} layers of width {r[model_config][d_model]} (d_inner
{r[model_config][d_inner]}, {r[model_config][nheads]} heads of {r[model_config][headdim]}, d_state
{r[model_config][d_state]}). Decode cost per token is about two multiply-adds per parameter, so a
2-core CPU runs it at interactive speed (below). The per-sequence
recurrent state is {r[state_bytes]:,} bytes (conv + fp32 ssm, all layers), which is what the
tiered cache stores per checkpoint. Weights are stored as fp16 (the loader converts to the
serving dtype); every figure below was measured on the fp16-rounded weights.

## Training data

The `*.py` files of the standard library of the Python that ran the training
({r[corpus][stdlib]}), read from disk, with no download:

- left out: `site-packages/`, generated codec tables (`encodings/cp*.py` etc.) and
  `pydoc_data/topics.py`;
- library modules are split by a SHA-256 hash of their relative path into train
  ({r[corpus][train_files]} files, {r[corpus][train_bytes]:,} bytes), validation
  ({r[corpus][valid_files]} files, used only to keep the best checkpoint) and held-out
  ({r[corpus][heldout_files]} files, {r[corpus][heldout_bytes]:,} bytes, only reported);
- test suites (`test/`, `tests/`, `idle_test/`: {r[corpus][test_files]} files,
  {r[corpus][test_bytes]:,} bytes) are training data only ({cfg[test_suites]}), never evaluated;
- {r[corpus][chat_examples]:,} chat examples built with `ast` from the train split: the user
  turn gives a function's signature and docstring (in one of four phrasings, some with a system
  turn), the assistant turn is the function's source.

The training stream holds each library file {repeats}, each chat example and test-suite file once:
{stream[library_tokens]:,} + {stream[chat_tokens]:,} + {stream[test_tokens]:,} tokens
(library, chat, tests).

Tokenizer: byte-level BPE trained with `tokenizers` on the train split, {cfg[vocab_size]} tokens
including 5 special tokens: `<|endoftext|>` (document separator, bos, pad), `<|end|>` (end of a
turn, eos), `<|system|>`, `<|user|>`, `<|assistant|>`. Plain encoding prepends `<|endoftext|>`,
as every training document followed one, so a raw prompt reads as the start of a file; chat
templates are encoded without it. The chat template renders
`<|role|>\\ncontent<|end|>\\n` per message and `<|assistant|>\\n` as the generation prompt.
Generation stops on `<|end|>` or `<|endoftext|>` (`generation_config.json`).

## Training

AdamW (betas {cfg[beta1]}, {cfg[beta2]}; weight decay {cfg[weight_decay]} on projection matrices),
peak learning rate {cfg[lr]}, {cfg[warmup_steps]} warm-up steps then cosine decay to
{cfg[min_lr_ratio]} of the peak, gradient clipping at {cfg[grad_clip]}, bf16 autocast, random
windows of {cfg[seq_len]} tokens, batch {cfg[batch_size]}, a wall-clock budget of
{cfg[time_budget_s]:.0f} s for the whole run. Validation every {cfg[eval_every]} steps; the best
checkpoint was step {r[result][best_step]:,} of {r[result][steps]:,}.

## Evaluation: held-out bits per byte

Each held-out file is scored on its own, in windows of {cfg[seq_len]} tokens that each start from a
zero state: total negative log-likelihood in bits over the file's UTF-8 bytes. `slice bpb` is the
same on `tests/data/heldout_slice.txt`, {r[slice_bytes]:,} bytes cut from the held-out files,
which a unit test re-measures on CPU and compares with the held-out figure (within 10%).

{runs}

{selection}
## Sample completions

{samples}
## CPU speed

{cpu}

## State restore fidelity

{fidelity}

## Reproduce

{reproduce}

## Limitations

Trained on about 10 MB of one project's code (plus its tests) for minutes: expect plausible-looking
Python that is often wrong, repetition under greedy decoding, and nothing useful outside Python.
The corpus is the Python Software Foundation's standard library (PSF License); the weights are
derived from it, hence `license: other`.
"""
