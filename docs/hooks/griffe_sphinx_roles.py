"""A griffe extension for the docs build: Sphinx roles in docstrings become markdown.

jadeis' docstrings are markdown, but some refer to other objects with Sphinx roles
(:func:`jadeis.sample`, :class:`~jadeis.Backprop`). mkdocstrings would show those
literally; this rewrites each into a cross-reference to the object's API entry when that
object is documented (``::: jadeis.NAME`` in docs/api/*.md), else into inline code.
The docstrings themselves are not changed (``help()`` keeps the roles).
"""

from __future__ import annotations

import pathlib
import re

import griffe

_ROLE = re.compile(r":(?:func|class|meth|attr|data|obj|mod|exc):`(~?)([\w.]+)`")
_API = pathlib.Path(__file__).parent / "api"


def _documented() -> set[str]:
    names = set()
    for page in _API.glob("*.md"):
        names.update(re.findall(r"^::: jadeis\.(\w+)\s*$", page.read_text(), flags=re.M))
    return names


class SphinxRoles(griffe.Extension):
    def __init__(self) -> None:
        super().__init__()
        self._names = _documented()

    def _rewrite(self, match: re.Match) -> str:
        short, path = match.group(1), match.group(2)
        shown = path.rsplit(".", 1)[-1] if short else path
        name = path.removeprefix("jadeis.")
        if name in self._names:
            return f"[`{shown}`][jadeis.{name}]"
        return f"`{shown}`"

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(self._rewrite, obj.docstring.value)
