"""An mkdocs hook: file references such as ``docs/math/adjoint.md#anchor`` become links.

Docstrings point to the documentation by path (``docs/math/schedules.md#vplinear``), which
reads well in ``help()`` and in the source. On the site, this turns each such reference in a
page's text (outside code blocks and existing links) into a link to that page and anchor.
A reference to a page that is not part of the site, or to an anchor that the page does not
have, fails the build (naming the page that holds the reference).
"""

from __future__ import annotations

import html
import re

from mkdocs.exceptions import PluginError

REFERENCE = re.compile(r"\bdocs/((?:[\w-]+/)*[\w-]+\.md)(?:#([\w-]+))?")
_TAG = re.compile(r"(<[^>]*>)")
_ID = re.compile(r'\bid="([^"]+)"')

_ids: dict[str, set[str]] = {}  # page src_uri -> element ids of its content
_anchors: list[tuple[str, str, str]] = []  # (referring page, target page, anchor)


def on_pre_build(**kwargs) -> None:
    _ids.clear()
    _anchors.clear()


def link_references(content: str, page, files) -> str:
    """Return ``content`` with every ``docs/...md`` reference in its text turned into a link."""
    parts = _TAG.split(content)
    in_link = in_pre = 0
    for i, part in enumerate(parts):
        if i % 2:  # a tag
            name = re.match(r"</?\s*(\w+)", part)
            name = name.group(1).lower() if name else ""
            closing = part.startswith("</")
            if name == "a":
                in_link += -1 if closing else 1
            elif name == "pre":
                in_pre += -1 if closing else 1
            continue
        if in_link or in_pre or "docs/" not in part:
            continue

        def link(match: re.Match) -> str:
            target, anchor = match.group(1), match.group(2)
            file = files.get_file_from_path(target)
            if file is None or not file.is_documentation_page():
                raise PluginError(
                    f"{page.file.src_uri}: refers to {match.group(0)!r}, but docs/{target} is "
                    "not a page of the site"
                )
            if anchor:
                _anchors.append((page.file.src_uri, file.src_uri, anchor))
            href = file.url_relative_to(page.file) + (f"#{anchor}" if anchor else "")
            return f'<a href="{html.escape(href)}">{match.group(0)}</a>'

        parts[i] = REFERENCE.sub(link, part)
    return "".join(parts)


def on_page_content(content: str, page, files, **kwargs) -> str:
    content = link_references(content, page, files)
    _ids[page.file.src_uri] = set(_ID.findall(content))
    return content


def on_post_build(**kwargs) -> None:
    missing = [
        f"{src}: refers to docs/{target}#{anchor}, but docs/{target} has no #{anchor}"
        for src, target, anchor in _anchors
        if anchor not in _ids.get(target, set())
    ]
    if missing:
        raise PluginError("\n".join(sorted(set(missing))))
