"""The demo chat set: questions about the standard library's public functions, answered from their own docstrings.

What it is, honestly: about four thousand short synthetic conversations generated offline from the interpreter's
standard library (PSF licence; nothing downloaded). Each asks what a function does, how to call it or where it
lives, and the assistant answers with its signature and the opening of its docstring; some carry a system prompt
and some a follow-up turn. It exercises the SFT path (template, loss mask, packing, epochs) and teaches a tiny
model the turn format and the answer style; it is not an instruction-following data set. Functions are split
between `train` and `val` by a hash of their qualified name, so validation asks about functions never trained on.
"""
from __future__ import annotations

import ast
import re
import sysconfig
import zlib
from pathlib import Path

SYSTEM_PROMPT = "You are a concise assistant that answers questions about the Python standard library."
QUESTIONS = (
    "What does `{qual}` do?",
    "Explain `{qual}` briefly.",
    "I found a call to `{qual}` in some code. What is it for?",
    "How do I call `{qual}`?",
)
VAL_EVERY = 20  # one function in 20 (by hash) is held out


def _summary(doc: str, limit: int = 400) -> str:
    """The docstring's first paragraphs, whitespace collapsed, cut at a sentence end within `limit` characters."""
    text = ""
    for para in doc.split("\n\n"):
        para = re.sub(r"\s+", " ", para).strip()
        if not para or (text and len(text) + len(para) > limit):
            break
        text = f"{text} {para}".strip()
    if len(text) > limit:
        cut = text.rfind(". ", 0, limit)
        text = text[:cut + 1] if cut > 40 else text[:limit].rstrip() + " ..."
    return text


def _functions(files: list[Path], root: Path):
    """(qualified name, module, signature, parameter names, docstring) of public functions and methods."""
    for path in files:
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        rel = path.relative_to(root).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        scopes = [(node, None) for node in tree.body]
        scopes += [(child, node.name) for node in tree.body if isinstance(node, ast.ClassDef)
                   for child in node.body]
        for node, owner in scopes:
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc) < 40:
                continue
            params = [a.arg for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs)
                      if a.arg not in ("self", "cls")]
            qual = ".".join(p for p in (module, owner, node.name) if p)
            yield qual, module, f"{node.name}({ast.unparse(node.args)})", params, doc


def conversation(qual: str, module: str, signature: str, params: list[str], doc: str) -> dict:
    """One tulu-3-style record about a function; which variant it gets is a hash of its name."""
    h = zlib.crc32(qual.encode())
    summary = _summary(doc)
    question = QUESTIONS[h % len(QUESTIONS)].format(qual=qual)
    if question.startswith("How do I call"):
        answer = f"Call it as `{signature}`. {summary}"
    else:
        answer = f"`{signature}`: {summary}"
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if h % 3 == 0:
        messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
    if h % 4 == 1:
        messages.append({"role": "user", "content": "Which module is it in?"})
        messages.append({"role": "assistant", "content": f"It is defined in `{module}`."})
    elif h % 4 == 2:
        messages.append({"role": "user", "content": "What parameters does it take?"})
        messages.append({"role": "assistant", "content": "It takes " + (
            ", ".join(f"`{p}`" for p in params) if params else "no parameters") + "."})
    return {"messages": messages, "source": "crescent-demo-stdlib-docstrings", "id": qual}


def chat_records(files: list[Path], limit: int = 4400) -> dict[str, list[dict]]:
    """{'train': [...], 'val': [...]}: up to `limit` functions (a hash-ordered spread over the library), one
    conversation each, split by a hash of the qualified name. Deterministic."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen, found = set(), []
    for qual, module, signature, params, doc in _functions(files, root):
        if qual not in seen:
            seen.add(qual)
            found.append((zlib.crc32(qual.encode()) >> 1, qual, module, signature, params, doc))
    found.sort()
    split: dict[str, list[dict]] = {"train": [], "val": []}
    for key, *fields in found[:limit]:
        split["val" if key % VAL_EVERY == 0 else "train"].append(conversation(*fields))
    return split
