"""A setup written as text (the CLI's ``--setup``, a server's ``model``): parsed, never executed."""

from __future__ import annotations

import ast
import json
from typing import Any

from adapterkit.core.composition.blocks import Block
from adapterkit.core.composition.grammar import BLOCKS, from_dict, parse
from adapterkit.errors import ConfigError


def parse_expression(text: str) -> Block:
    """A setup written as text: ``"a"``, ``"a, b"`` (a stack), ``"Fuse(a, b, c)"``,
    ``"Average(a, b, weights=[1, 3])"``, ``"PerRow([a, None, b])"``, or ``to_dict()`` JSON.

    Only block names, adapter names (quote names with ``-``), numbers and lists are read: the
    text is parsed, never executed.
    """
    text = text.strip()
    if text.startswith("{"):
        return parse(from_dict(json.loads(text)))
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError as e:
        raise ConfigError(f"cannot parse setup {text!r}: {e.msg}") from e
    value = _read(node)
    return parse(list(value) if isinstance(value, tuple) else value)


def _read(node: ast.AST) -> Any:
    constructors = {cls.__name__: cls for cls in BLOCKS.values()}
    if isinstance(node, ast.Name):
        return None if node.id == "None" else node.id
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, type(None))):
        return node.value
    if isinstance(node, ast.Tuple):
        return tuple(_read(e) for e in node.elts)
    if isinstance(node, ast.List):
        return [_read(e) for e in node.elts]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in constructors:
        args = [_read(a) for a in node.args]
        return constructors[node.func.id](*args, **{k.arg: _read(k.value) for k in node.keywords})
    raise ConfigError(
        f"cannot read {ast.unparse(node)!r} in a setup; use adapter names, numbers, lists and {', '.join(constructors)}"
    )
