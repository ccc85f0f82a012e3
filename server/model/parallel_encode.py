"""Long texts tokenized on several cores, with exactly the ids and offsets of one whole-text encode.

`ParallelEncoder.encode(text)` cuts a text of `MIN_CHARS` or more into pieces of about `PIECE_CHARS`,
encodes them with the Rust backend's `encode_batch` (parallel over the pieces, rayon) and joins the ids
and the offsets shifted by each piece's start (in Rust, `Encoding.merge`, when each piece's last token
ends where the piece does, as it does unless a BPE without an unknown token dropped that character;
else in Python). That equals the encode of the whole text only where nothing in the tokenizer's pipeline
can reach across a cut, so a tokenizer gets a `ParallelEncoder` only when its `backend_tokenizer`
configuration proves that (`ParallelEncoder.of`; otherwise None, and every text is encoded whole).

**The cut.** A cut goes before a space (U+0020) at p whose left neighbour text[p-1] is a letter or digit
(`str.isalnum`) or printable ASCII: never whitespace under any definition. Also, no added token's
content may occur within `window` characters of p (the longest content), and, when a normalizer runs,
those characters must be ASCII. Through the pipeline of the HF `tokenizers` library:

1. *Added tokens* are matched first, leftmost-longest, in the raw text (and, for normalized ones, in
   the normalized text). A match that crosses p, ends at p (`rstrip` takes the spaces after it) or
   starts at p (`single_word` looks at the character before it) would lie within `window` of p, so
   there is none. `lstrip` takes spaces to its left, and text[p-1] is not one. With no candidate match
   across p, the matches chosen in the whole text are those chosen in each piece.
2. *Normalizers*: NFC, NFD, NFKC, NFKD and sequences of them. U+0020 has canonical combining class 0,
   is a quick-check "yes" in all four forms, and is the second character of no composition, so
   normalize(a + b) = normalize(a) + normalize(b) when b starts with it. The ASCII window keeps the text
   near p unchanged (ASCII is stable in all four forms), so steps 1 and 3 see the same characters there.
3. *Pre-tokenizers*, in order, with the space at p tracked as the character it has become:
   - cutters that split at p: ByteLevel with its regex (GPT-2's), `Split` with one of the regexes in
     `_CUT_PATTERNS` (isolated, not inverted), `Whitespace`, `WhitespaceSplit`, and Metaspace with
     `split` (the space becomes the replacement character, which starts a piece). In those regexes a
     space is part of a match only as its optional first character or inside an all-whitespace match,
     so no match holds both text[p-1] and text[p]; they have no look-behind or anchor, so matching
     from p does not depend on what came before, and the match that ends at p ends there also
     when the text ends at p (text[p] is a space, which none of the classes before it takes);
   - character-local pre-tokenizers that keep a piece across p or not but change nothing else:
     `Digits`, `Punctuation`, ByteLevel without its regex (bytes to characters: the space becomes
     `Ġ`), Metaspace without `split`. Prefix spaces (ByteLevel `add_prefix_space`, Metaspace
     `prepend_scheme`) are not added to a piece that starts with the space (or the replacement),
     so the piece after p gets none, as in the whole text; both need the space unchanged, as the
     Metaspace replacement does.
   Once p separates pieces, later pre-tokenizers see the same pieces either way; any known one is
   allowed then.
4. *The model* encodes each pre-token on its own (BPE without dropout, WordPiece, WordLevel, Unigram).
   When no pre-tokenizer cut at p (Metaspace without `split`, as in Llama / Mistral conversions), a BPE
   still cannot merge across p if no vocabulary entry holds the seam character (the space as it became)
   after another character: every merge result is a vocabulary entry, and a merge across p would hold
   text[p-1]'s last character followed by it. It also needs no word prefix or suffix, no dropout, the
   seam character in the vocabulary when unknown characters fuse, and an unknown token: a BPE without
   one drops an unknown character, and the offsets of the word's later tokens then fall short by its
   length, which a cut would reset.
5. *Post-processors* with `add_special_tokens=False` add nothing; `trim_offsets` (ByteLevel, Roberta)
   moves each token's offsets by its own spaces, except that with `add_prefix_space` the first token of
   a sequence keeps one, which would differ for the first token of a piece: that pair is refused.

Anything else (other normalizers such as Prepend, Replace or Precompiled, unknown regexes before the
text is cut, other models, a slow tokenizer) is not proven, and the text is encoded whole. A text
without enough cuts (no spaces, CJK text, a space only after whitespace) is encoded with fewer pieces,
or whole. The chosen cuts are checked, never assumed: each is tested in the text itself.

Parallelism is rayon's, inside `encode_batch`: `TOKENIZERS_PARALLELISM=false` makes the pieces run one
after the other (still exact, no faster), and so does a process forked after the backend ran in
parallel (the library then turns it off in the child; the server's engine process is spawned, and the
API process tokenizes in threads, which the backend releases the GIL for). The encoder holds its own
copy of the backend, with no truncation or padding, that nothing mutates, so it needs no lock.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

log = logging.getLogger(__name__)

Spans = list[tuple[int, int]]
Config = Mapping[str, Any]

MIN_CHARS = 16_384  # shorter texts are encoded whole (bench/parallel_encode_cpu.py, BENCHMARKS.md)
PIECE_CHARS = 8_192  # a piece is about this long
MAX_PIECES = 64
_SCAN = 2_048  # characters searched for a cut past each target position
_SPACE = " "
_BYTE_LEVEL_SPACE = "\u0120"  # Ġ, GPT-2's byte-level character for the space
_NORMALIZERS = frozenset({"NFC", "NFD", "NFKC", "NFKD"})
_CHAR_LOCAL = frozenset({"Digits", "Punctuation"})
_CUTTERS = frozenset({"Whitespace", "WhitespaceSplit"})
_AFTER_CUT = frozenset({"UnicodeScripts", "CharDelimiterSplit", "FixedLength", "BertPreTokenizer"})
_TEMPLATES = frozenset({"TemplateProcessing", "BertProcessing"})
_TRIMMERS = frozenset({"ByteLevel", "RobertaProcessing"})
_PER_WORD_MODELS = frozenset({"BPE", "WordPiece", "WordLevel", "Unigram"})
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_CL100K = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _CL100K.replace(r"\p{N}{1,3}", r"\p{N}")
# regexes in which a space is only an optional first character or part of an all-whitespace match,
# every character starts a match, and nothing looks behind: GPT-2's, cl100k's (Llama 3), Qwen2's
_CUT_PATTERNS = frozenset({_GPT2, _CL100K, _QWEN2})


class Unproven(Exception):
    """A part of the tokenizer's pipeline for which no cut is proven exact (the message says which)."""


@dataclass(frozen=True)
class CutRule:
    """Where a text may be cut: before a space, see the module."""

    window: int  # characters either side of the cut that hold no added token (the longest content)
    ascii: bool  # a normalizer runs: the window must be ASCII
    added: re.Pattern[str] | None  # any added token's content, raw or normalized

    def allows(self, text: str, p: int) -> bool:
        left = text[p - 1]
        if text[p] != _SPACE or not (left.isalnum() or "!" <= left <= "~"):
            return False
        near = text[max(0, p - self.window) : p + self.window]
        if self.ascii and not near.isascii():
            return False
        return self.added is None or self.added.search(near) is None


def cut_rule(config: Config, added: Sequence[str]) -> CutRule:
    """The cut rule of a tokenizer's serialized configuration (`backend_tokenizer.to_str()`) whose added
    tokens' contents are `added` (raw, and normalized for normalized ones); `Unproven` if none is exact."""
    normalized = _normalizer(config.get("normalizer"))
    cut, seam = _pre_tokenizers(config.get("pre_tokenizer"), False, _SPACE)
    _model(config["model"], cut, seam)
    _post_processor(config.get("post_processor"))
    contents = sorted({c for c in added if c}, key=len, reverse=True)
    pattern = re.compile("|".join(map(re.escape, contents))) if contents else None
    window = max((len(c) for c in contents), default=0)
    return CutRule(max(window, 1 if normalized else 0), normalized, pattern)


def _normalizer(config: Config | None) -> bool:
    """Whether a normalizer runs (`Unproven` for one that is not cut-safe)."""
    if config is None:
        return False
    kind = config["type"]
    if kind == "Sequence":
        for part in config["normalizers"]:
            _normalizer(part)
        return True
    if kind not in _NORMALIZERS:
        raise Unproven(f"normalizer {kind}")
    return True


def _pre_tokenizers(config: Config | None, cut: bool, seam: str) -> tuple[bool, str]:
    """(whether the pieces are separate at the cut, what the space at the cut has become) after the
    pre-tokenizer `config`, given the same before it."""
    if config is None:
        return cut, seam
    kind = config["type"]
    if kind == "Sequence":
        for part in config["pretokenizers"]:
            cut, seam = _pre_tokenizers(part, cut, seam)
        return cut, seam
    if kind == "ByteLevel":
        if config.get("add_prefix_space", True):
            _need_space(cut, seam, "ByteLevel add_prefix_space")
        return _cutter(cut, seam, kind) if config.get("use_regex", True) else cut, _BYTE_LEVEL_SPACE
    if kind == "Metaspace":
        _need_space(False, seam, kind)
        replacement = str(config["replacement"])
        if replacement.isalnum() or replacement.isascii():
            raise Unproven(f"Metaspace replacement {replacement!r}, which a cut's left character can be")
        return cut or bool(config.get("split", True)), replacement
    if kind == "Split":
        return _split(config, cut, seam), seam
    if kind in _CUTTERS:
        return _cutter(cut, seam, kind), seam
    if kind in _CHAR_LOCAL or (cut and kind in _AFTER_CUT):
        return cut, seam
    raise Unproven(f"pre-tokenizer {kind}" + ("" if cut else " before the text is cut"))


def _split(config: Config, cut: bool, seam: str) -> bool:
    pattern = config["pattern"].get("Regex")
    known = pattern in _CUT_PATTERNS and config["behavior"] == "Isolated" and not config["invert"]
    if not (known or cut):
        raise Unproven("a Split pattern not known to cut before a space")
    return _cutter(cut, seam, "Split")


def _cutter(cut: bool, seam: str, kind: str) -> bool:
    _need_space(cut, seam, kind)
    return True


def _need_space(cut: bool, seam: str, kind: str) -> None:
    if not cut and seam != _SPACE:
        raise Unproven(f"{kind} after a pre-tokenizer that changed the space")


def _model(config: Config, cut: bool, seam: str) -> None:
    kind = config["type"]
    if kind not in _PER_WORD_MODELS:
        raise Unproven(f"model {kind}")
    if config.get("dropout"):
        raise Unproven("BPE dropout")
    if not cut:
        _bpe_separates(config, seam)


def _bpe_separates(config: Config, seam: str) -> None:
    """A BPE merges nothing across the seam character (the module, step 4), else `Unproven`."""
    if config["type"] != "BPE":
        raise Unproven(f"no pre-tokenizer cuts the text before a space, and model {config['type']}")
    if config.get("continuing_subword_prefix") or config.get("end_of_word_suffix"):
        raise Unproven("no pre-tokenizer cuts the text before a space, and BPE word prefixes")
    vocab: Mapping[str, int] = config["vocab"]
    if config.get("unk_token") not in vocab:  # a dropped character shifts the offsets after it in the word
        raise Unproven("no pre-tokenizer cuts the text before a space, and BPE drops unknown characters")
    if config.get("fuse_unk") and seam not in vocab:
        raise Unproven("BPE fuses unknown characters, the seam character among them")
    across = re.compile(f"[^{re.escape(seam)}]{re.escape(seam)}")
    if any(across.search(token) for token in vocab):
        raise Unproven(f"BPE vocabulary entries with {seam!r} after another character")


def _post_processor(config: Config | None) -> None:
    if config is None:
        return
    kind = config["type"]
    if kind == "Sequence":
        for part in config["processors"]:
            _post_processor(part)
    elif kind in _TRIMMERS:
        if config.get("trim_offsets", True) and config.get("add_prefix_space", True):
            raise Unproven(f"post-processor {kind} trims offsets with add_prefix_space")
    elif kind not in _TEMPLATES:
        raise Unproven(f"post-processor {kind}")


class ParallelEncoder:
    """Encodes long texts in pieces on several cores, exactly as one encode (see the module)."""

    def __init__(
        self,
        backend: Any,
        rule: CutRule,
        *,
        min_chars: int = MIN_CHARS,
        piece_chars: int = PIECE_CHARS,
        max_pieces: int = MAX_PIECES,
    ) -> None:
        if min_chars < 2 or piece_chars < 1 or max_pieces < 2:
            raise ValueError("min_chars must be >= 2, piece_chars >= 1 and max_pieces >= 2")
        self._backend = backend
        self.rule = rule
        self.min_chars = min_chars
        self.piece_chars = piece_chars
        self.max_pieces = max_pieces

    @classmethod
    def of(cls, hf: Any, **kw: Any) -> ParallelEncoder | None:
        """The encoder of a transformers tokenizer, or None where no cut is proven exact (logged)."""
        backend = getattr(hf, "backend_tokenizer", None) if getattr(hf, "is_fast", False) else None
        if backend is None:
            return None
        from tokenizers import Tokenizer as RustTokenizer

        text = backend.to_str()
        try:
            rule = cut_rule(json.loads(text), list(_added_contents(backend)))
        except Unproven as exc:
            log.info("long texts are tokenized whole: %s", exc)
            return None
        copy = RustTokenizer.from_str(text)
        copy.no_truncation()
        copy.no_padding()
        copy.encode_special_tokens = bool(getattr(hf, "split_special_tokens", False))
        return cls(copy, rule, **kw)

    def cuts(self, text: str) -> list[int]:
        """Ascending cut positions in (0, len(text)) for pieces of about `piece_chars`; [] for a short text."""
        n = len(text)
        pieces = min(self.max_pieces, n // self.piece_chars) if n >= self.min_chars else 0
        out: list[int] = []
        for i in range(1, pieces):
            start = max(i * n // pieces, out[-1] + 1 if out else 1)
            p = self._cut_from(text, start, min(n, start + _SCAN))
            if p is not None:
                out.append(p)
        return out

    def _cut_from(self, text: str, start: int, stop: int) -> int | None:
        p = text.find(_SPACE, start, stop)
        while p != -1 and not self.rule.allows(text, p):
            p = text.find(_SPACE, p + 1, stop)
        return None if p == -1 else p

    def encode(self, text: str) -> tuple[list[int], Spans] | None:
        """Ids and (start, end) character offsets of `text` (no special tokens added), as one encode gives
        them; None when the text is too short or has no cut (encode it whole)."""
        cuts = self.cuts(text)
        if not cuts:
            return None
        bounds = [0, *cuts, len(text)]
        pieces = [text[a:b] for a, b in pairwise(bounds)]
        encodings = self._backend.encode_batch(pieces, add_special_tokens=False)
        if all(_ends_at(enc, len(piece)) for enc, piece in zip(encodings, pieces[:-1], strict=False)):
            from tokenizers import Encoding

            # each piece's offsets grow by the end of the one before: where the piece before ends
            merged = Encoding.merge(encodings, growing_offsets=True)
            return merged.ids, merged.offsets
        return _joined(bounds, encodings)


def _ends_at(encoding: Any, end: int) -> bool:
    """Whether an encoding's last token ends at `end` (not so when its last character was dropped)."""
    n = len(encoding)
    return n > 0 and encoding.token_to_chars(n - 1)[1] == end


def _joined(bounds: list[int], encodings: list[Any]) -> tuple[list[int], Spans]:
    """The pieces' ids, and their offsets shifted by where each piece starts."""
    ids: list[int] = []
    spans: Spans = []
    for start, enc in zip(bounds, encodings, strict=False):
        ids.extend(enc.ids)
        offsets = enc.offsets
        spans.extend(offsets if start == 0 else [(s + start, e + start) for s, e in offsets])
    return ids, spans


def _added_contents(backend: Any) -> Iterator[str]:
    """Each added token's content, and its normalized form for a normalized token (what matching sees)."""
    normalizer = backend.normalizer
    for token in backend.get_added_tokens_decoder().values():
        yield str(token.content)
        if token.normalized and normalizer is not None:
            yield str(normalizer.normalize_str(token.content))
