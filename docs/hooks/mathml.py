"""An mkdocs hook: the site's TeX formulas become MathML when the site is built.

``pymdownx.arithmatex`` (generic mode) wraps ``$...$`` in ``<span class="arithmatex">\\(...\\)
</span>`` and ``$$...$$`` in ``<div class="arithmatex">\\[...\\]</div>``. This hook converts each
one with math-core (a TeX-to-MathML-Core converter from PyPI, in the ``docs`` extra) into a
``<math>`` element, which browsers render natively (Chromium 109+, Firefox, Safari). The built
pages need no script and no network to show formulas. The site also ships the STIX Two Math
font (SIL Open Font License, taken from the ``ziamath`` wheel of the ``docs`` extra, which bundles
it), so that formulas look the same whatever math fonts the reader's system has.

Why MathML made at build time: MathJax or KaTeX would have to be vendored from npm and run in
the reader's browser; latex2mathml (pure Python) turns ``aligned`` environments into one line
with literal ``&`` and shows ``\\_`` inside ``\\text``. math-core converts every formula of these
pages (``\\operatorname``, ``\\mathrm``, ``aligned``, ``cases``, ``\\tag``, ``\\big``, ...) into
MathML Core, the subset browsers implement.

A formula math-core cannot convert fails the build, naming the page and the formula.
"""

from __future__ import annotations

import html
import importlib.util
import pathlib
import re
import shutil

import math_core
from mkdocs.exceptions import PluginError

_INLINE = re.compile(r'<span class="arithmatex">\\\((.*?)\\\)</span>', re.S)
_BLOCK = re.compile(r'<div class="arithmatex">\\\[(.*?)\\\]</div>', re.S)
# a numbered display (\tag{...}) needs an equation environment in math-core, as in LaTeX
_TAG = re.compile(r"\\tag\*?\{")
_ENVIRONMENT = re.compile(r"^\s*\\begin\{(equation|align|gather|multline)\*?\}")

_CONVERTER = math_core.LatexToMathML(fancy_error=False)


def to_mathml(tex: str, *, display: bool) -> str:
    """The MathML of one formula; raises ``math_core.LatexError``."""
    if display and _TAG.search(tex) and not _ENVIRONMENT.match(tex):
        tex = "\\begin{equation}" + tex + "\\end{equation}"
    return _CONVERTER.convert_with_local_state(tex, displaystyle=display)


def convert_page(content: str, where: str) -> str:
    """Replace every arithmatex formula of a page's HTML by MathML."""

    def convert(match: re.Match, display: bool) -> str:
        tex = html.unescape(match.group(1))
        try:
            mathml = to_mathml(tex, display=display)
        except math_core.LatexError as e:
            raise PluginError(
                f"{where}: cannot convert this formula to MathML ({e}):\n{tex.strip()}"
            ) from None
        return f'<div class="math-display">{mathml}</div>' if display else mathml

    content = _BLOCK.sub(lambda m: convert(m, True), content)
    return _INLINE.sub(lambda m: convert(m, False), content)


def on_page_content(content: str, page, **kwargs) -> str:
    return convert_page(content, page.file.src_uri)


FONT = "STIXTwoMath-Regular.ttf"  # docs/stylesheets/extra.css loads it from stylesheets/fonts/


def font_path() -> pathlib.Path:
    spec = importlib.util.find_spec("ziamath")
    path = None if spec is None else pathlib.Path(spec.origin).parent / "fonts" / FONT
    if path is None or not path.is_file():
        raise PluginError(
            f"the math font {FONT} comes from the ziamath package, which is not installed: "
            "pip install -e '.[docs]'"
        )
    return path


def on_post_build(config, **kwargs) -> None:
    target = pathlib.Path(config["site_dir"]) / "stylesheets" / "fonts" / FONT
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(font_path(), target)
