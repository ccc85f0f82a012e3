"""ParallelEncoder: a long text encoded in pieces gives exactly the ids and offsets of one whole-text encode,
on every tokenizer whose configuration proves its cuts; the others are never cut."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.model.chat_encoding import ChatEncoder
from server.model.parallel_encode import _CL100K, _QWEN2, MIN_CHARS, CutRule, ParallelEncoder
from server.model.tokenizer import Tokenizer
from server.settings import default_model_path
from tests.integration.server_proc import char_tokenizer
from tests.tiny_models import make_tokenizer

Encoded = tuple[list[int], list[tuple[int, int]]]
_CORPUS = [
    "the quick brown fox's 42 jumps over 3.14159 lazy dogs; naïve café 日本語 😀 it's   spaced\tout\n\nend",
    "def add(a, b):\n    return a + b  # 1234567\n",
    "Hello, World! 12345 ｆｕｌｌ ﬁne ① e\u0301 x\u00a0y über straße",
] * 10
_SPECIALS = ["<|endoftext|>", "<|end|>", "<|user|>"]
_FRAGMENTS = [
    " ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", " \n", "\u00a0", "\u3000", "\u2002",
    "a", "the", "Quick", "fox's", "'s", "'", "it's", "42", "1234567", "3.14", "é", "e\u0301", "naïve",
    "日本語", "😀", "ﬁ", "①", "ｆｕｌｌ", "\u00a8", "▁", "Ġ", ".", ",", "!", "#", "(", "_", "-",
    "<|endoftext|>", "<|end|>", "<|user|>", "<|", "|>", "<|end", "<mask>", "<R>", "<w>", "w",
]  # fmt: skip
_TEXTS = st.lists(st.sampled_from(_FRAGMENTS), max_size=120).map("".join)


# ---- tokenizers ---------------------------------------------------------------------------------


def _fast(rust: Any, **kw: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=rust, **kw)


def _trained(model: Any, trainer: Any, *, normalizer: Any = None, pre: Any = None, post: Any = None) -> Any:
    from tokenizers import Tokenizer as RustTokenizer

    rust = RustTokenizer(model)
    if normalizer is not None:
        rust.normalizer = normalizer
    if pre is not None:
        rust.pre_tokenizer = pre
    rust.train_from_iterator(_CORPUS, trainer)
    if post is not None:
        rust.post_processor = post
    return rust


def _bpe_trainer(**kw: Any) -> Any:
    from tokenizers import pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    return trainers.BpeTrainer(vocab_size=400, special_tokens=_SPECIALS, initial_alphabet=alphabet, **kw)


def _neox() -> Any:
    """GPT-NeoX's layout (state-spaces' Mamba): NFC, byte-level regex, offsets trimmed, normalized
    whitespace added tokens; plus added tokens with lstrip, rstrip and single_word."""
    from tokenizers import AddedToken, models, normalizers, pre_tokenizers, processors

    rust = _trained(
        models.BPE(),
        _bpe_trainer(),
        normalizer=normalizers.NFC(),
        pre=pre_tokenizers.ByteLevel(add_prefix_space=False),
        post=processors.ByteLevel(trim_offsets=True, add_prefix_space=False),
    )
    rust.add_tokens([AddedToken("  ", normalized=True), AddedToken("    ", normalized=True)])
    rust.add_special_tokens(
        [
            AddedToken("<mask>", lstrip=True),
            AddedToken("<R>", rstrip=True),
            AddedToken("<w>", single_word=True),
        ]
    )
    return _fast(rust)


def _regex_split(pattern: str, nfkc: bool = False) -> Callable[[], Any]:
    """Llama 3 / Qwen2: a Split regex, then bytes to characters; offsets trimmed, a BOS template."""

    def build() -> Any:
        from tokenizers import Regex, models, normalizers, pre_tokenizers, processors

        pre = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        bos = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
        post = processors.Sequence([processors.ByteLevel(trim_offsets=True, add_prefix_space=False), bos])
        normalizer = normalizers.NFKC() if nfkc else None
        return _fast(_trained(models.BPE(), _bpe_trainer(), normalizer=normalizer, pre=pre, post=post))

    return build


def _falcon() -> Any:
    from tokenizers import models, pre_tokenizers

    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Punctuation(),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
            pre_tokenizers.Digits(),
        ]
    )
    return _fast(_trained(models.BPE(), _bpe_trainer(), pre=pre))


def _metaspace(
    model: str, prepend: str, split: bool = True, train_split: bool | None = None
) -> Callable[[], Any]:
    """SentencePiece conversions: Metaspace; `train_split` (default `split`) is the pre-tokenizer trained with
    (Llama 2 / Mistral conversions encode with split=False a vocabulary trained on words)."""

    def build() -> Any:
        from tokenizers import models, normalizers, pre_tokenizers, trainers

        train_pre = pre_tokenizers.Metaspace(
            prepend_scheme=prepend, split=split if train_split is None else train_split
        )
        if model == "unigram":
            trainer = trainers.UnigramTrainer(
                vocab_size=300, special_tokens=["<unk>", *_SPECIALS], unk_token="<unk>"
            )
            rust = _trained(models.Unigram(), trainer, pre=train_pre)
        else:
            trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", *_SPECIALS])
            bpe = models.BPE(unk_token="<unk>", fuse_unk=True)
            rust = _trained(
                bpe, trainer, normalizer=normalizers.NFKC() if prepend == "always" else None, pre=train_pre
            )
        rust.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=prepend, split=split)
        return _fast(rust, unk_token="<unk>")

    return build


def _whitespace_words() -> Any:
    from tokenizers import models, pre_tokenizers, trainers

    trainer = trainers.WordLevelTrainer(vocab_size=200, special_tokens=["<unk>", *_SPECIALS])
    rust = _trained(models.WordLevel(unk_token="<unk>"), trainer, pre=pre_tokenizers.Whitespace())
    return _fast(rust, unk_token="<unk>")


def _chars(unk: bool) -> Any:
    """tests.integration.server_proc's character tokenizer (no pre-tokenizer, no merges), optionally with
    an unknown token."""
    if not unk:
        return _fast(char_tokenizer())
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models

    vocab = {t: i for i, t in enumerate(["<unk>", *_SPECIALS, *map(chr, range(32, 127)), "\n"])}
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    rust.add_special_tokens(_SPECIALS)
    return _fast(rust, unk_token="<unk>")


def _demo() -> Any:
    return Tokenizer.from_pretrained(default_model_path()).hf


def _tiny(tmp: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(make_tokenizer(tmp / "tiny")))


PROVEN: dict[str, Callable[[], Any]] = {
    "demo": _demo,
    "chars-unk": lambda: _chars(unk=True),  # no pre-tokenizer: BPE without merges across the space
    "neox": _neox,
    "llama3": _regex_split(_CL100K),
    "qwen2-nfkc": _regex_split(_QWEN2, nfkc=True),
    "falcon": _falcon,
    "spm-bpe-always-nfkc": _metaspace("bpe", "always"),
    "spm-unigram-first": _metaspace("unigram", "first"),
    "llama2-no-split": _metaspace("bpe", "first", split=False, train_split=True),
    "whitespace-words": _whitespace_words,
}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    built = {name: build() for name, build in PROVEN.items()}
    built["tiny"] = _tiny(tmp_path_factory.mktemp("tok"))
    return built


# ---- helpers ------------------------------------------------------------------------------------


def _whole(hf: Any, text: str) -> Encoded:
    enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), list(enc["offset_mapping"])


def _every_cut(hf: Any) -> ParallelEncoder:
    """An encoder that cuts at every allowed position (a piece per character, as many pieces as that)."""
    encoder = ParallelEncoder.of(hf, min_chars=2, piece_chars=1, max_pieces=1 << 20)
    assert encoder is not None
    return encoder


def _assert_exact(encoder: ParallelEncoder, hf: Any, text: str) -> int:
    """The pieces' encoding equals the whole one; returns the number of cuts."""
    got = encoder.encode(text)
    assert got is None or got == _whole(hf, text)
    return len(encoder.cuts(text))


def _long_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["the", "state", "of", "mamba", "42", "3.14", "naïve", "日本", "😀", "it's", "\n", "  ", "<|end|>"]  # fmt: skip
    return " ".join(rng.choice(words) for _ in range(n_words))


# ---- exactness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*PROVEN, "tiny"])
def test_every_tokenizer_here_is_proven(tokenizers: dict[str, Any], name: str) -> None:
    assert ParallelEncoder.of(tokenizers[name]) is not None


@pytest.mark.parametrize("name", [*PROVEN, "tiny"])
@settings(max_examples=150, deadline=None)
@given(text=_TEXTS)
def test_cutting_at_every_allowed_place_is_exact(tokenizers: dict[str, Any], name: str, text: str) -> None:
    hf = tokenizers[name]
    _assert_exact(_every_cut(hf), hf, text)


@pytest.mark.parametrize("name", [*PROVEN, "tiny"])
def test_adversarial_seams_are_exact_and_cut(tokenizers: dict[str, Any], name: str) -> None:
    """Runs of spaces, tabs and newlines, added tokens, digits and unicode right at the spaces."""
    hf = tokenizers[name]
    texts = [
        "a  b   c\t d \n e\n f \r\n g   \n\n  h",
        "x <|end|> y<|end|> z <|end|>w <|user|>  <|endoftext|>   v",
        "1 12 123 1234 12345 3.14 1,000 x1 1x",
        "naïve café e\u0301 ﬁ ① ｆｕｌｌ 日本 語 😀 😀x x😀 ▁x Ġx",
        "a<mask> b  <mask> c<R> d <R>  e <w> f<w> g <w>h",
        "it's it 's it' s fox's ' s",
    ]
    encoder = _every_cut(hf)
    assert sum(_assert_exact(encoder, hf, t) for t in texts) > 0


def test_an_added_token_that_only_the_normalized_text_holds(tokenizers: dict[str, Any]) -> None:
    """NFKC turns "ﬁ " into "fi ", where the normalized added token "i " crosses the space: no cut there."""
    from tokenizers import AddedToken

    hf = _regex_split(_QWEN2, nfkc=True)()
    hf.backend_tokenizer.add_tokens([AddedToken("i ", normalized=True)])
    segment = "xﬁ y " + "w" * 30 + " " + "w" * 30 + " "
    text = segment * 3
    assert _assert_exact(_every_cut(hf), hf, text) == 4
    assert _every_cut(hf).cuts(text) == [35, 102, 169, 200]  # between the w's, and at the end


def test_a_piece_whose_last_character_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A BPE without an unknown token drops "ж", so the piece before the cut ends short of the cut: the
    offsets are shifted one piece at a time instead of by the pieces' ends."""
    from tokenizers import pre_tokenizers

    from server.model import parallel_encode

    hf = _chars(unk=False)
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    joined: list[int] = []
    real = parallel_encode._joined

    def spy(bounds: list[int], encodings: list[Any]) -> Encoded:
        joined.append(len(encodings))
        return real(bounds, encodings)

    monkeypatch.setattr(parallel_encode, "_joined", spy)
    encoder = _every_cut(hf)
    assert _assert_exact(encoder, hf, "ab cd ef") == 2 and not joined
    assert _assert_exact(encoder, hf, "aж bж cж") == 2 and joined


@pytest.mark.parametrize("name", ["demo", "neox", "llama3", "spm-unigram-first", "llama2-no-split"])
def test_a_long_text_is_cut_into_pieces_and_exact(tokenizers: dict[str, Any], name: str) -> None:
    hf = tokenizers[name]
    encoder = ParallelEncoder.of(hf)
    assert encoder is not None
    text = _long_text(MIN_CHARS // 3)
    assert len(text) > MIN_CHARS
    assert _assert_exact(encoder, hf, text) >= len(text) // encoder.piece_chars - 2


def test_a_short_text_is_encoded_whole(tokenizers: dict[str, Any]) -> None:
    encoder = ParallelEncoder.of(tokenizers["demo"])
    assert encoder is not None
    assert encoder.encode(_long_text(100)) is None


@pytest.mark.parametrize(
    "text",
    [
        "a" * (2 * MIN_CHARS),  # one long word
        "日本語のテキスト" * (MIN_CHARS // 4),  # no spaces at all
        "x\n" * MIN_CHARS,  # whitespace, but no space
        "x " + "\t " * MIN_CHARS,  # every space after whitespace
        "<|end|> " * (MIN_CHARS // 4),  # every space next to an added token
    ],
)
def test_a_long_text_without_a_safe_cut_is_encoded_whole(tokenizers: dict[str, Any], text: str) -> None:
    encoder = ParallelEncoder.of(tokenizers["demo"])
    assert encoder is not None
    assert encoder.cuts(text) == [] and encoder.encode(text) is None


def test_cuts_go_before_a_space_after_a_word_away_from_added_tokens(tokenizers: dict[str, Any]) -> None:
    text = "abc \tdef\n ghij  kl mn" + "x" * 20 + "<|end|> yz"
    assert _every_cut(tokenizers["demo"]).cuts(text) == [3, 14, 18]


def test_a_piece_ends_at_the_first_cut_past_its_target(tokenizers: dict[str, Any]) -> None:
    encoder = ParallelEncoder.of(tokenizers["demo"], min_chars=2, piece_chars=8)
    assert encoder is not None
    assert encoder.cuts("abcdefghijklmnop qrstuvwxyz") == [16]  # targets 9 and 18: one cut


def test_split_special_tokens_is_followed(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(default_model_path()), split_special_tokens=True)
    encoder = ParallelEncoder.of(hf, min_chars=2, piece_chars=8)
    assert encoder is not None
    text = "a <|end|> b lorem ipsum dolor sit amet" * 40
    assert _assert_exact(encoder, hf, text) > 0
    assert 1 not in _whole(hf, text)[0]  # <|end|> spelled out, not its id


def test_parallelism_off_gives_the_same(tokenizers: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    hf = tokenizers["demo"]
    assert _assert_exact(_every_cut(hf), hf, _long_text(2_000)) > 0


def test_threads_encode_at_once_without_a_lock(tokenizers: dict[str, Any]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    hf = tokenizers["demo"]
    encoder = ParallelEncoder.of(hf)
    assert encoder is not None
    texts = [_long_text(MIN_CHARS // 2, seed) for seed in range(8)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(encoder.encode, texts))
    assert got == [_whole(hf, t) for t in texts]


# ---- through Tokenizer and ChatEncoder ----------------------------------------------------------


def test_encode_offsets_and_ends_of_a_long_text() -> None:
    tok = Tokenizer.from_pretrained(default_model_path())
    text = _long_text(MIN_CHARS // 2)
    assert tok.parallel is not None and tok.parallel.cuts(text)
    ids, spans = _whole(tok.hf, text)
    assert tok.encode_offsets(text) == (ids, spans)
    assert tok.encode_with_ends(text)[0] == ids


def test_chat_encoder_on_a_long_first_turn() -> None:
    tok = Tokenizer.from_pretrained(default_model_path())
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": _long_text(MIN_CHARS // 2)},
    ]
    whole = Tokenizer(tok.hf, tok.model_name, tok.chat_template)
    whole.parallel = None
    out = ChatEncoder(tok).encode(msgs, "k")
    assert (list(out.tokens), out.boundaries) == whole.encode_chat(msgs)


# ---- refusals -----------------------------------------------------------------------------------


def _prepend_replace() -> Any:
    """Llama 2's old conversion: Prepend("▁") and Replace(" ", "▁"), no pre-tokenizer."""
    from tokenizers import models, normalizers

    rust = _trained(models.BPE(), _bpe_trainer())
    rust.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    return _fast(rust)


def _edited(base: Callable[[], Any], edit: Callable[[Any], None]) -> Callable[[], Any]:
    def build() -> Any:
        hf = base()
        edit(hf.backend_tokenizer)
        return hf

    return build


def _set(attr: str, value: Callable[[], Any]) -> Callable[[Any], None]:
    return lambda backend: setattr(backend, attr, value())


def _pre(*parts: str) -> Callable[[], Any]:
    def make() -> Any:
        from tokenizers import Regex, pre_tokenizers

        named = {
            "unknown-split": lambda: pre_tokenizers.Split(Regex(r"\w+ "), "isolated"),
            "byte-level": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            "metaspace": lambda: pre_tokenizers.Metaspace(),
        }
        return pre_tokenizers.Sequence([named[p]() for p in parts])

    return make


def _dropout(backend: Any) -> None:
    backend.model.dropout = 0.1


def _lowercase() -> Any:
    from tokenizers import normalizers

    return normalizers.Lowercase()


def _trim_with_prefix_space() -> Any:
    from tokenizers import processors

    return processors.ByteLevel(trim_offsets=True, add_prefix_space=True)


UNPROVEN: dict[str, tuple[Callable[[], Any], str]] = {
    "prepend-replace": (_prepend_replace, "normalizer Prepend"),
    "lowercase": (_edited(_falcon, _set("normalizer", _lowercase)), "normalizer Lowercase"),
    "unknown-regex": (_edited(_falcon, _set("pre_tokenizer", _pre("unknown-split"))), "Split pattern"),
    "metaspace-after-bytes": (
        _edited(_falcon, _set("pre_tokenizer", _pre("byte-level", "metaspace"))),
        "changed the space",
    ),
    "prefix-space-trim": (
        _edited(_falcon, _set("post_processor", _trim_with_prefix_space)),
        "add_prefix_space",
    ),
    "dropout": (_edited(_falcon, _dropout), "dropout"),
    "vocab-across-spaces": (_metaspace("bpe", "first", split=False), "vocabulary entries"),
    "chars-without-unk": (lambda: _chars(unk=False), "drops unknown characters"),
}


@pytest.mark.parametrize("name", UNPROVEN)
def test_an_unproven_tokenizer_is_never_cut(name: str, caplog: pytest.LogCaptureFixture) -> None:
    build, reason = UNPROVEN[name]
    hf = build()
    with caplog.at_level(logging.INFO, logger="server.model.parallel_encode"):
        assert ParallelEncoder.of(hf) is None
    assert reason in caplog.text
    tok = Tokenizer(hf, name)
    assert tok.parallel is None
    if name != "dropout":  # dropout samples: two encodes differ anyway
        text = _long_text(MIN_CHARS // 3)
        assert tok.encode_offsets(text) == _whole(hf, text)


def test_a_slow_tokenizer_is_never_cut(tokenizers: dict[str, Any]) -> None:
    class Slow:
        is_fast = False
        backend_tokenizer = tokenizers["demo"].backend_tokenizer

    assert ParallelEncoder.of(Slow()) is None


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("prepend-replace", "the fox"),
        ("unknown-regex", "ab cd"),
        ("metaspace-after-bytes", "the fox"),
        ("prefix-space-trim", "the fox"),
        ("vocab-across-spaces", "the quick brown fox"),
        ("chars-without-unk", "\ta b"),
    ],
)
def test_each_refusal_guards_against_a_real_difference(name: str, text: str) -> None:
    """Cut anyway (a rule that allows every cut before a space), these tokenizers do give other tokens."""
    hf = UNPROVEN[name][0]()
    anyway = ParallelEncoder(
        hf.backend_tokenizer, CutRule(0, False, None), min_chars=2, piece_chars=1, max_pieces=64
    )
    assert anyway.cuts(text)
    assert anyway.encode(text) != _whole(hf, text)
