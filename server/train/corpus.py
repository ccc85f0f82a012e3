"""The training corpus: the Python standard library source of the running interpreter.

Nothing is downloaded. Every `*.py` file under `sysconfig.get_paths()["stdlib"]` is a document,
except:
- `site-packages/` (third-party code, differs from machine to machine) and `__pycache__/`;
- generated data files: character-mapping codec tables (`encodings/cp1252.py` etc.: hex tables)
  and `pydoc_data/topics.py` (one 750 KB string of prose);
- files that are not valid UTF-8.

Library modules are split into train, validation and held-out sets by a deterministic hash
(SHA-256) of the path relative to the stdlib root, so the split is the same on every machine for the
same Python version. Test suites (files under a `test`, `tests` or `idle_test` directory; about
60% of the stdlib's bytes) are repetitive, assertion-heavy code, so they are never evaluated on,
but they are real Python: by default they are extra training data (the run is data-bound, not
compute-bound), and `test_suites="exclude"` leaves them out.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
EXCLUDED_FILES = frozenset({"pydoc_data/topics.py"})
GENERATED_MARKER = "Python Character Mapping Codec"


@dataclass(frozen=True)
class Document:
    """One source file: `path` is relative to the stdlib root, with '/' separators."""

    path: str
    text: str

    @property
    def is_test(self) -> bool:
        return any(part in TEST_DIRS for part in self.path.split("/")[:-1])


@dataclass(frozen=True)
class Corpus:
    train: tuple[Document, ...]  # library modules (chat examples come from these)
    valid: tuple[Document, ...]  # picks the best checkpoint
    heldout: tuple[Document, ...]  # reported bits per byte; never trained on or selected by
    tests: tuple[Document, ...] = ()  # test suites, training only

    def __post_init__(self) -> None:
        if not self.train or not self.valid or not self.heldout:
            raise ValueError("corpus split left the train, validation or held-out set empty")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def path_fraction(rel_path: str) -> float:
    """Deterministic position in [0, 1): the first 8 bytes of SHA-256(path) over 2**64."""
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(rel_path: str, heldout_fraction: float, valid_fraction: float) -> str:
    """Split name: "heldout" for [0, h), "valid" for [h, h + v), "train" above."""
    x = path_fraction(rel_path)
    if x < heldout_fraction:
        return "heldout"
    return "valid" if x < heldout_fraction + valid_fraction else "train"


def _wanted(rel: Path) -> bool:
    if any(part in EXCLUDED_DIRS for part in rel.parts[:-1]):
        return False
    return rel.as_posix() not in EXCLUDED_FILES


def _read(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    if GENERATED_MARKER in text[:2000] or not text.strip():
        return None
    return text


def collect_documents(root: Path | None = None, max_files: int | None = None) -> list[Document]:
    """All wanted `*.py` files under `root` (default: the stdlib), sorted by relative path."""
    base = root if root is not None else stdlib_root()
    docs: list[Document] = []
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(base)
        if not _wanted(rel):
            continue
        text = _read(path)
        if text is not None:
            docs.append(Document(rel.as_posix(), text))
    return docs[:max_files] if max_files is not None else docs


def split_documents(
    docs: list[Document],
    heldout_fraction: float = 0.05,
    valid_fraction: float = 0.03,
    with_tests: bool = True,
) -> Corpus:
    parts: dict[str, list[Document]] = {"train": [], "valid": [], "heldout": [], "tests": []}
    for doc in docs:
        key = "tests" if doc.is_test else split_of(doc.path, heldout_fraction, valid_fraction)
        parts[key].append(doc)
    tests = tuple(parts["tests"]) if with_tests else ()
    return Corpus(tuple(parts["train"]), tuple(parts["valid"]), tuple(parts["heldout"]), tests)


def load_corpus(
    heldout_fraction: float = 0.05,
    valid_fraction: float = 0.03,
    with_tests: bool = True,
    root: Path | None = None,
    max_files: int | None = None,
    max_file_bytes: int | None = None,
) -> Corpus:
    """Collect and split. For smoke runs, `max_file_bytes` drops larger files and `max_files`
    keeps the first N files of train (a quarter of that of the other splits)."""
    docs = collect_documents(root)
    if max_file_bytes is not None:
        docs = [d for d in docs if len(d.text.encode("utf-8")) <= max_file_bytes]
    corpus = split_documents(docs, heldout_fraction, valid_fraction, with_tests)
    if max_files is None:
        return corpus
    small = max(1, max_files // 4)
    return Corpus(
        corpus.train[:max_files], corpus.valid[:small], corpus.heldout[:small], corpus.tests[:small]
    )


def total_bytes(docs: tuple[Document, ...] | list[Document]) -> int:
    return sum(len(d.text.encode("utf-8")) for d in docs)
