"""Corpus split (deterministic, disjoint, tests never evaluated) and ast-derived chat examples."""

from __future__ import annotations

from pathlib import Path

from server.train.chat_examples import build_chat_examples, examples_from_document
from server.train.corpus import Document, collect_documents, split_documents, split_of

_SOURCE = '''\
import os


def documented(a, b=1):
    """Add two numbers.

    Longer text.
    """
    total = a + b
    return total


def undocumented(x):
    y = x * 2
    z = y + 1
    return z


class Box:
    def get(self, key, default=None):
        """Return the value for key."""
        value = self._data.get(key, default)
        self.hits += 1
        return value
'''


def _write_tree(root: Path) -> None:
    files = {
        "mod.py": _SOURCE,
        "pkg/__init__.py": "x = 1\n",
        "test/test_mod.py": "assert True\n",
        "site-packages/thirdparty.py": "y = 2\n",
        "encodings/cp9999.py": '""" Python Character Mapping Codec cp9999 generated from X """\n',
        "pydoc_data/topics.py": "topics = {}\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_collect_skips_third_party_and_generated_files(tmp_path: Path) -> None:
    _write_tree(tmp_path)
    paths = [d.path for d in collect_documents(tmp_path)]
    assert paths == ["mod.py", "pkg/__init__.py", "test/test_mod.py"]


def test_split_is_deterministic_disjoint_and_keeps_tests_out_of_evaluation() -> None:
    docs = [Document(f"m{i}.py", "x = 1\n") for i in range(400)] + [Document("test/test_a.py", "a\n")]
    corpus = split_documents(docs, heldout_fraction=0.1, valid_fraction=0.1)
    again = split_documents(list(reversed(docs)), heldout_fraction=0.1, valid_fraction=0.1)
    names = [{d.path for d in part} for part in (corpus.train, corpus.valid, corpus.heldout)]
    assert names == [{d.path for d in part} for part in (again.train, again.valid, again.heldout)]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    assert 20 <= len(corpus.heldout) <= 60 and 20 <= len(corpus.valid) <= 60
    assert [d.path for d in corpus.tests] == ["test/test_a.py"]
    assert split_documents(docs, 0.1, 0.1, with_tests=False).tests == ()


def test_split_of_depends_only_on_the_path() -> None:
    assert split_of("json/decoder.py", 0.05, 0.03) == split_of("json/decoder.py", 0.05, 0.03)
    assert {split_of(f"f{i}.py", 0.5, 0.25) for i in range(50)} == {"train", "valid", "heldout"}


def test_chat_examples_pair_signature_and_docstring_with_source() -> None:
    examples = examples_from_document(Document("pkg/mod.py", _SOURCE))
    assert [ex.key for ex in examples] == ["pkg/mod.py:4", "pkg/mod.py:20"]
    first = examples[0]
    user, assistant = first.messages[-2]["content"], first.messages[-1]["content"]
    assert "def documented(a, b=1):" in user and "Add two numbers." in user and "total = a + b" not in user
    assert assistant.startswith("def documented(a, b=1):") and assistant.endswith("return total\n")
    method = examples[1].messages[-1]["content"]
    assert method.startswith("def get(self, key, default=None):") and "        " not in method.splitlines()[0]


def test_chat_examples_are_deterministic_and_render_with_the_template() -> None:
    doc = Document("pkg/mod.py", _SOURCE)
    assert build_chat_examples([doc]) == build_chat_examples([doc])
    text = examples_from_document(doc)[0].render()
    assert "<|user|>\n" in text and text.endswith("return total\n<|end|>\n")


def test_unparsable_files_give_no_examples() -> None:
    assert examples_from_document(Document("bad.py", "def broken(:\n")) == []
