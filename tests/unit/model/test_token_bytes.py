"""`Tokenizer.token_bytes`: a token's own bytes for byte-level BPE, SentencePiece byte fallback, added
tokens and plain vocabularies; the bytes of a text's tokens add up to the text's UTF-8."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.model.tokenizer import Tokenizer, _byte_alphabet, byte_level_bytes
from server.train.tokenizer import save_tokenizer
from tests.integration.server_proc import char_tokenizer
from tests.tiny_models import make_tokenizer

UNSEEN = "жёлтый"  # Cyrillic: not in the tiny corpus, so byte-level BPE keeps it as single bytes


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_pretrained(make_tokenizer(tmp_path_factory.mktemp("bpe")))


def _byte_fallback_tokenizer() -> Tokenizer:
    """A SentencePiece-style BPE with byte fallback: `<0x00>`..`<0xFF>` and a few words, `▁` for spaces."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "a", "b", "▁a", "▁b"]
    vocab = {p: i for i, p in enumerate(pieces)}
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=[("▁", "a"), ("▁", "b")], byte_fallback=True))
    rust.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    rust.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=rust, unk_token="<unk>", eos_token="</s>")
    return Tokenizer(hf, "byte-fallback")


def _assert_bytes_add_up(tok: Tokenizer, text: str, expected: str | None = None) -> list[int]:
    ids = tok.encode(text, add_special_tokens=False)
    assert b"".join(tok.token_bytes(i) for i in ids) == (text if expected is None else expected).encode()
    return ids


def test_byte_alphabet_is_gpt2s() -> None:
    from tokenizers import pre_tokenizers

    alphabet = _byte_alphabet()
    assert set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet())
    assert sorted(alphabet.values()) == list(range(256))
    assert byte_level_bytes("Ġhello") == b" hello" and byte_level_bytes("a b") is None


def test_byte_level_tokens_carry_their_bytes(byte_level: Tokenizer) -> None:
    ids = _assert_bytes_add_up(byte_level, f"hello {UNSEEN} 🙂")
    partial = [i for i in ids if not _is_utf8(byte_level.token_bytes(i))]
    assert len(partial) >= 2 * len(UNSEEN)  # each Cyrillic letter: two byte tokens
    assert all(byte_level.token_text(i) == "\ufffd" for i in partial)
    assert len({byte_level.token_bytes(i) for i in partial}) > 1


def test_byte_fallback_tokens_carry_their_byte() -> None:
    """Pieces read as they do mid-text: the space the normalizer prepends shows (" ab é")."""
    tok = _byte_fallback_tokenizer()
    ids = _assert_bytes_add_up(tok, "ab é", expected=" ab é")
    c3 = tok.hf.convert_tokens_to_ids("<0xC3>")
    assert c3 in ids and tok.token_bytes(c3) == b"\xc3" and tok.token_text(c3) == "\ufffd"


def test_added_tokens_are_their_content(byte_level: Tokenizer) -> None:
    assert byte_level.eos_token_id is not None
    assert byte_level.token_bytes(byte_level.eos_token_id) == b"<|endoftext|>"


def test_plain_vocabularies_use_the_text(tmp_path: Path) -> None:
    save_tokenizer(char_tokenizer(), tmp_path / "chars")
    tok = Tokenizer.from_pretrained(tmp_path / "chars")
    _assert_bytes_add_up(tok, "def f(x):\n    return x")


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True
