"""Chat-formatted training examples derived from the corpus with `ast`.

For each top-level function, and each method of a top-level class, that has a docstring, the user
turn asks for the function by its signature and docstring, and the assistant turn is the function's
source (docstring included, as in the file; decorators not). Some examples open with a system
turn, so the model has seen all three roles. Prompts vary among a few phrasings, chosen by a
deterministic hash of the function's location, so the same corpus always gives the same examples.
"""

from __future__ import annotations

import ast
import hashlib
import io
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass

from server.train.corpus import Document
from server.train.tokenizer import render_chat

SYSTEM_PROMPT = "You are a helpful assistant that writes Python code in the style of the standard library."
PROMPTS = (
    "Write a Python function with this signature and docstring:\n\n{sig}\n{doc}",
    "Implement `{name}`.\n\n{sig}\n{doc}",
    "{sig}\n{doc}",
    "Complete this function from the {module} module:\n\n{sig}\n{doc}",
)
MAX_BODY_CHARS = 3000
MIN_BODY_LINES = 2

FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef


@dataclass(frozen=True)
class ChatExample:
    key: str  # "path:lineno", unique
    messages: tuple[dict[str, str], ...]

    def render(self) -> str:
        return render_chat(self.messages)


def _stable_int(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def _signature(node: FunctionNode, lines: list[str]) -> str:
    """The `def` line(s) up to the first statement of the body, dedented."""
    return textwrap.dedent("".join(lines[node.lineno - 1 : node.body[0].lineno - 1])).rstrip()


def _docstring_block(node: FunctionNode) -> str:
    doc = ast.get_docstring(node, clean=True) or ""
    return '    """' + doc.replace("\n", "\n    ") + '"""'


def _functions(tree: ast.Module) -> Iterator[FunctionNode]:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node
        elif isinstance(node, ast.ClassDef):
            yield from (n for n in node.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))


def _example(doc: Document, lines: list[str], node: FunctionNode) -> ChatExample | None:
    if ast.get_docstring(node) is None or node.end_lineno is None:
        return None
    body = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno]))
    if len(body) > MAX_BODY_CHARS:
        return None
    if body.count("\n") < MIN_BODY_LINES + 2:
        return None
    key = f"{doc.path}:{node.lineno}"
    choice = _stable_int(key)
    module = doc.path.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
    user = PROMPTS[choice % len(PROMPTS)].format(
        sig=_signature(node, lines), doc=_docstring_block(node), name=node.name, module=module
    )
    messages: list[dict[str, str]] = []
    if (choice >> 8) % 4 == 0:
        messages.append({"role": "system", "content": SYSTEM_PROMPT})
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": body.rstrip() + "\n"}]
    return ChatExample(key=key, messages=tuple(messages))


def examples_from_document(doc: Document) -> list[ChatExample]:
    try:
        tree = ast.parse(doc.text)
    except (SyntaxError, ValueError):
        return []
    lines = io.StringIO(doc.text, newline="").readlines()  # \n, \r\n, \r only, as ast counts
    found = (_example(doc, lines, node) for node in _functions(tree))
    return [ex for ex in found if ex is not None]


def build_chat_examples(docs: tuple[Document, ...] | list[Document]) -> list[ChatExample]:
    """All examples from `docs` (pass the train split only, so held-out code never leaks)."""
    return [ex for doc in docs for ex in examples_from_document(doc)]
