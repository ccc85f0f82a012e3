"""Tokenizer and chat template of a served model.

The tokenizer comes from the model directory through transformers' `AutoTokenizer`. The chat
template is the one in `tokenizer_config.json` (or a `chat_template.jinja` next to it); a model
without one gets `FALLBACK_CHAT_TEMPLATE`, a ChatML-like format:

    <|im_start|>system\\n{content}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n

With the fallback, `<|im_end|>` is also a stop string (`chat_stop`), since a base model's
vocabulary rarely has it as one token.

`encode_chat` also returns message *boundaries*: for each message, the token position where the
rendering of the conversation up to and including that message ends. They are capture candidates
for the state cache, and each is a true prefix of the full rendering: the partial rendering must be
a string prefix of the full one, and the position counts only whole tokens inside it.
`encode_chat` renders every message prefix and tokenizes everything; `chat_encoding.ChatEncoder`
gives the same result per conversation turn at the cost of what is new.

Rendering options, as vLLM passes them: `add_generation_prompt` (default true), `continue_final_message`
(render without the generation prompt and cut the text at the end of the final message's content, so
that the model continues it; transformers' renderer does the cut) and `template_kwargs` (extra variables
for the template, e.g. `enable_thinking`; not the names in `RESERVED_TEMPLATE_NAMES`). Boundaries come
from partial renderings with the same `template_kwargs`.

`token_bytes(id)` is a token's own bytes, for logprobs: a byte-level BPE token's characters mapped back
through GPT-2's byte alphabet, a SentencePiece byte-fallback token `<0xAB>` as the byte 0xAB, another
SentencePiece piece with its `▁` as spaces (as it reads mid-text: the decoder drops the space a text
starts with), else the UTF-8 of its text. A token that holds part of a multi-byte character has bytes
that are not valid UTF-8 on their own (its text is U+FFFD).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache.prefix import common_prefix_len
from server.model.parallel_encode import ParallelEncoder, Spans

log = logging.getLogger(__name__)

FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
FALLBACK_STOP = "<|im_end|>"

Message = Mapping[str, Any]
_REPLACEMENT = "\ufffd"
_DECODE_CONTEXT = 6  # tokens decoded before a window: a token can render differently at the start
_MAX_HELD = 64  # tokens a window may hold an incomplete character before its anchor moves anyway
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_METASPACE = "\u2581"  # SentencePiece's visible space
# what `chat_template_kwargs` may not set: the parameters of transformers' `apply_chat_template` (5.17),
# which would otherwise bind to them, and the template's own `messages`
RESERVED_TEMPLATE_NAMES = frozenset(
    {
        "messages", "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
        "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
        "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
    }
)  # fmt: skip


def model_eos_ids(model_dir: Path) -> tuple[int, ...]:
    """End-of-sequence ids a model directory declares in generation_config.json or config.json."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        try:
            value = json.loads((model_dir / name).read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(i) for i in value if isinstance(i, int))
    return tuple(sorted(ids))


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered (an unsupported role, a template error)."""


@dataclass(frozen=True)
class AddedTokens:
    """The added tokens a fast tokenizer splits its input on, before normalizing or pre-tokenizing."""

    # id -> content of the tokens matched as-is in the raw text: not normalized, no lstrip / rstrip /
    # single-word rule, no whitespace at either end of the content
    verbatim: Mapping[int, str]
    max_len: int  # the longest content of any added token, in characters


class Tokenizer:
    """A transformers tokenizer plus the chat template and stop tokens the server uses."""

    def __init__(
        self, hf: Any, model_name: str, chat_template: str | None = None, extra_eos: Sequence[int] = ()
    ) -> None:
        self.hf = hf
        self._extra_eos = tuple(extra_eos)
        # transformers mutates the Rust tokenizer's padding/truncation state on every encode, so
        # concurrent encodes (API threads) are serialized, and decoding (the engine's worker
        # thread, once per token) uses its own copy of the backend tokenizer.
        self._lock = threading.Lock()
        self._decoder = _backend_copy(hf)
        # long texts in pieces on several cores where that is proven exact (None: every text is encoded
        # whole), through its own backend copy and without the lock: a short encode (`encode_now`) need
        # not wait for a long one
        self.parallel: ParallelEncoder | None = ParallelEncoder.of(hf)
        self.model_name = model_name
        self.uses_fallback_template = not chat_template
        self.chat_template = chat_template or FALLBACK_CHAT_TEMPLATE
        self.eos_token_id: int | None = hf.eos_token_id
        self.eos_ids: tuple[int, ...] = self._eos_ids()
        fallback_single = hf.convert_tokens_to_ids(FALLBACK_STOP) if self.uses_fallback_template else None
        # Stop strings implied by the template (always applied to chat requests by the API).
        self.chat_stop: tuple[str, ...] = (FALLBACK_STOP,) if self.uses_fallback_template else ()
        if isinstance(fallback_single, int) and fallback_single != hf.unk_token_id:
            self.eos_ids = tuple(sorted({*self.eos_ids, fallback_single}))
        self.vocab_size: int = len(hf)
        self._byte_level, self._byte_fallback, self._metaspace = _byte_schemes(hf)
        self._added_ids = frozenset(int(i) for i in getattr(hf, "added_tokens_decoder", {}))
        self._bytes: dict[int, bytes] = {}  # token_bytes, filled on use
        # `decode` of one token, filled on use (twice the vocabulary at most: with and without special tokens)
        self._lone: dict[tuple[int, bool], str] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, model_name: str | None = None) -> Tokenizer:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path))
        template = getattr(hf, "chat_template", None)
        if isinstance(template, dict):  # several named templates: take the default one
            template = template.get("default") or next(iter(template.values()), None)
        if not template:
            log.info("tokenizer at %s has no chat template; using the ChatML-like fallback", path)
        name = model_name or Path(str(path).rstrip("/")).name or str(path)
        return cls(hf, name, template or None, extra_eos=model_eos_ids(Path(path)))

    def _eos_ids(self) -> tuple[int, ...]:
        ids = {self.eos_token_id} if self.eos_token_id is not None else set()
        ids.update(self._extra_eos)
        return tuple(sorted(i for i in ids if i is not None))

    # ---- plain text -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        with self._lock:
            return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def encode_now(self, text: str) -> list[int] | None:
        """`encode(text)` if no other thread is encoding now, else None (for callers that must not wait,
        such as the event loop)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return list(self.hf.encode(text, add_special_tokens=True))
        finally:
            self._lock.release()

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Plain decode (no clean-up of spaces, so that incremental decoding stays prefix-stable). A lone token
        (half of the detokenizer's decodes: `server.engine.detokenizer`, per row per step) is decoded once."""
        if len(ids) == 1:
            key = (ids[0], skip_special_tokens)
            text = self._lone.get(key)
            if text is None:
                text = self._lone[key] = self._decode(list(ids), skip_special_tokens)
            return text
        return self._decode(ids if isinstance(ids, list) else list(ids), skip_special_tokens)

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if self._decoder is not None:
            return str(self._decoder.decode(ids, skip_special_tokens=skip_special_tokens))
        with self._lock:
            return str(self.hf.decode(ids, skip_special_tokens=skip_special_tokens))

    def token_text(self, token_id: int) -> str:
        """One token's text for logprob entries (special tokens included)."""
        return self.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """One token's own bytes (see the module); not valid UTF-8 for part of a multi-byte character."""
        raw = self._bytes.get(token_id)
        if raw is None:
            raw = self._bytes[token_id] = self._raw_bytes(token_id)
        return raw

    def _raw_bytes(self, token_id: int) -> bytes:
        piece = self._piece(token_id) if token_id not in self._added_ids else None
        if piece is not None and self._byte_fallback and (m := _BYTE_FALLBACK.fullmatch(piece)):
            return bytes([int(m.group(1), 16)])
        if piece is not None and self._byte_level and (raw := byte_level_bytes(piece)) is not None:
            return raw
        if piece is not None and self._metaspace and _METASPACE in piece:
            return piece.replace(_METASPACE, " ").encode()
        return self.token_text(token_id).encode()

    def _piece(self, token_id: int) -> str | None:
        """The vocabulary entry of a token (`convert_ids_to_tokens`), None if it has none."""
        if self._decoder is not None:
            piece = self._decoder.id_to_token(token_id)
        else:
            with self._lock:
                piece = self.hf.convert_ids_to_tokens(token_id)
        return piece if isinstance(piece, str) else None

    # ---- chat -------------------------------------------------------------------------------

    def render_chat(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        *,
        continue_final_message: bool = False,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        msgs = [normalize_message(m) for m in messages]
        extra = dict(template_kwargs or {})
        if reserved := sorted(RESERVED_TEMPLATE_NAMES & extra.keys()):
            raise ChatTemplateError(f"template variables {', '.join(reserved)} cannot be set")
        try:
            with self._lock:
                text = self.hf.apply_chat_template(
                    msgs,
                    chat_template=self.chat_template,
                    add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message,
                    tokenize=False,
                    **extra,
                )
        except Exception as exc:  # jinja raises TemplateError, raise_exception(...) too
            raise ChatTemplateError(f"cannot render the conversation: {exc}") from exc
        return str(text)

    def encode_chat(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        *,
        continue_final_message: bool = False,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> tuple[list[int], list[int]]:
        """(prompt tokens, message-end boundaries) of a conversation, boundaries ascending in [1, len]."""
        if not messages:
            raise ChatTemplateError("messages must not be empty")
        full = self.render_chat(
            messages,
            add_generation_prompt,
            continue_final_message=continue_final_message,
            template_kwargs=template_kwargs,
        )
        tokens, ends = self.encode_with_ends(full)
        boundaries: set[int] = set()
        for i in range(1, len(messages) + 1):
            try:
                part = self.render_chat(
                    messages[:i], add_generation_prompt=False, template_kwargs=template_kwargs
                )
            except ChatTemplateError:
                continue  # a template may refuse some partial conversations
            chars = common_prefix_len(part, full)
            position = _tokens_within(ends, chars)
            if position > 0:
                boundaries.add(position)
        return tokens, sorted(boundaries)

    @property
    def has_offsets(self) -> bool:
        """A fast tokenizer, which reports each token's character span (a slow one does not)."""
        return bool(getattr(self.hf, "is_fast", False))

    def encode_offsets(self, text: str) -> tuple[list[int], Spans] | None:
        """Tokens of `text` (no special tokens added) and each one's (start, end) character span.

        None for a slow tokenizer, which reports no offsets. A long text is encoded in pieces on several
        cores where that is proven to give the same (`parallel_encode`)."""
        if not self.has_offsets:
            return None
        if self.parallel is not None and (pieces := self.parallel.encode(text)) is not None:
            return pieces
        with self._lock:
            enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), list(enc["offset_mapping"])

    def encode_with_ends(self, text: str) -> tuple[list[int], list[int]]:
        """Tokens of `text` and, per token, the character offset where it ends (a running maximum).

        A slow tokenizer has no offsets: a token ends where the decoding of the tokens up to it ends."""
        encoded = self.encode_offsets(text)
        if encoded is not None:
            return encoded[0], _monotonic([e for _, e in encoded[1]])
        tokens = self.encode(text, add_special_tokens=False)
        decode = lambda ids: self.decode(ids, skip_special_tokens=False)
        lengths = _prefix_lengths(decode, tokens)
        if lengths is None:  # a decoder that is not local: decode every prefix (quadratic)
            lengths = [len(decode(tokens[: i + 1])) for i in range(len(tokens))]
        return tokens, _monotonic(lengths)

    def added_tokens(self) -> AddedTokens | None:
        """The added tokens, or None (a slow tokenizer, or one told to encode special tokens as text)."""
        backend = getattr(self.hf, "backend_tokenizer", None) if self.has_offsets else None
        if backend is None or getattr(self.hf, "split_special_tokens", False):
            return None
        with self._lock:
            if getattr(backend, "encode_special_tokens", True):
                return None
            added = dict(backend.get_added_tokens_decoder())
        verbatim = {i: t.content for i, t in added.items() if _verbatim(t)}
        return AddedTokens(verbatim, max((len(t.content) for t in added.values()), default=0))


def _verbatim(token: Any) -> bool:
    content = str(token.content)
    plain = not (token.normalized or token.lstrip or token.rstrip or token.single_word)
    return plain and bool(content) and content == content.strip()


def _prefix_lengths(decode: Callable[[Sequence[int]], str], tokens: Sequence[int]) -> list[int] | None:
    """len(decode(tokens[:i + 1])) for every i, decoding short windows: O(tokens * window).

    An anchor is a token after which the decoded text ends with a whole character. Each window is
    decoded from a few tokens before the anchor (a token may render differently at the start of a
    sequence) and adds, past the anchor, whatever it decodes beyond the anchor's own window. The
    pieces are checked to add up to decode(tokens); None when they do not (a decoder whose output
    for early tokens depends on later ones), for the caller to decode every prefix instead."""
    lengths: list[int] = []
    pieces: list[str] = []
    anchor = anchor_len = 0
    base = window = ""
    for i in range(len(tokens)):
        lo = max(0, anchor - _DECODE_CONTEXT)
        window = decode(tokens[lo : i + 1])
        if not window.startswith(base):
            return None
        lengths.append(anchor_len + len(window) - len(base))
        if not window.endswith(_REPLACEMENT) or i + 1 - anchor >= _MAX_HELD:
            pieces.append(window[len(base) :])
            anchor, anchor_len = i + 1, lengths[-1]
            base = decode(tokens[max(0, anchor - _DECODE_CONTEXT) : anchor])
            window = base
    pieces.append(window[len(base) :])
    return lengths if "".join(pieces) == decode(tokens) else None


def _byte_schemes(hf: Any) -> tuple[bool, bool, bool]:
    """(byte-level: the decoder maps GPT-2's byte alphabet back to bytes, byte fallback: `<0xAB>` pieces are
    bytes, metaspace: the decoder turns `▁` into spaces). A slow tokenizer is taken to be SentencePiece."""
    backend = getattr(hf, "backend_tokenizer", None) if getattr(hf, "is_fast", False) else None
    if backend is None:
        return False, True, True
    decoder = backend.decoder.__getstate__().decode() if backend.decoder is not None else ""
    metaspace = '"Metaspace"' in decoder or f'"{_METASPACE}"' in decoder
    return '"ByteLevel"' in decoder, bool(getattr(backend.model, "byte_fallback", False)), metaspace


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: the printable bytes stand for themselves, and the
    others (controls, space, DEL, NBSP, soft hyphen, ...) for chr(256 + k), k their rank among them."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out = {chr(b): b for b in printable}
    rest = sorted(set(range(256)) - set(printable))
    out.update({chr(256 + k): b for k, b in enumerate(rest)})
    return out


_BYTE_ALPHABET = _byte_alphabet()


def byte_level_bytes(piece: str) -> bytes | None:
    """A byte-level BPE vocabulary entry as the bytes it stands for; None if it is not one."""
    try:
        return bytes(_BYTE_ALPHABET[c] for c in piece)
    except KeyError:
        return None


def _backend_copy(hf: Any) -> Any:
    """An independent copy of a fast tokenizer's Rust backend (None for a slow tokenizer)."""
    backend = getattr(hf, "backend_tokenizer", None) if getattr(hf, "is_fast", False) else None
    if backend is None:
        return None
    from tokenizers import Tokenizer as RustTokenizer

    return RustTokenizer.from_str(backend.to_str())


def normalize_message(message: Message) -> dict[str, Any]:
    """A message whose content is a string (OpenAI content parts are joined). A dict whose content is already
    a string is returned as it is: nothing here or in the template's sandbox writes to it, and a turn normalizes
    each message of the conversation once per render (a copy each was most of the chat encoder's per-message
    cost)."""
    if type(message) is dict and type(message.get("content")) is str:
        return message
    out = dict(message)
    content = out.get("content")
    if content is None:
        out["content"] = ""
    elif not isinstance(content, str):
        parts = [p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text"]
        out["content"] = "".join(str(p) for p in parts)
    return out


def _monotonic(ends: list[int]) -> list[int]:
    """Running maximum of token end offsets (special or empty tokens may report 0)."""
    out, high = [], 0
    for e in ends:
        high = max(high, e)
        out.append(high)
    return out


def _tokens_within(ends: Sequence[int], chars: int) -> int:
    """Number of leading tokens that end at or before character `chars`."""
    lo, hi = 0, len(ends)
    while lo < hi:
        mid = (lo + hi) // 2
        if ends[mid] <= chars:
            lo = mid + 1
        else:
            hi = mid
    return lo
