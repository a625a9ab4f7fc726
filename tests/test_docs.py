"""The documentation: the guides' code runs, the public API is declared, the site builds.

- Every ```python block of docs/index.md, docs/getting-started.md and docs/guides/*.md runs,
  in order, in one fresh namespace per page, in a fresh interpreter (JAX's float32 defaults,
  as a reader would run it: the x64 setting of conftest.py does not reach it). A failure
  reports the page and the line of the markdown file.
- ``jadeis.__all__`` lists exactly the public names, and ``help()`` shows the docstrings.
- ``mkdocs build --strict`` (warnings are errors) succeeds; skipped when the ``docs`` extra
  is not installed.
"""

import importlib.util
import os
import pathlib
import pydoc
import re
import subprocess
import sys
import types

import pytest

import jadeis

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)


def _pages():
    pages = [DOCS / "index.md", DOCS / "getting-started.md", *sorted(DOCS.glob("guides/*.md"))]
    return [p for p in pages if p.exists()]


def _blocks(page):
    """(first line number in the page, code) of each ```python block."""
    text = page.read_text()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in BLOCK.finditer(text)]


_RUNNER = r"""
import json, sys
page, blocks = sys.argv[1], json.loads(sys.stdin.read())
namespace = {"__name__": "__main__"}
for line, code in blocks:
    # pad so that tracebacks give the line number in the markdown file
    exec(compile("\n" * (line - 1) + code, page, "exec"), namespace)
"""


def _env():
    env = dict(os.environ)
    env.pop("JAX_ENABLE_X64", None)
    # the checked-out package, whatever is installed
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def test_guides_have_code():
    guides = sorted(DOCS.glob("guides/*.md"))
    assert len(guides) >= 7
    for page in [DOCS / "getting-started.md", *guides]:
        assert _blocks(page), f"{page.relative_to(ROOT)} has no ```python block"


@pytest.mark.parametrize(
    "page", [p for p in _pages() if _blocks(p)], ids=lambda p: str(p.relative_to(DOCS))
)
def test_doc_page_runs(page, tmp_path):
    import json

    rel = str(page.relative_to(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, rel],
        input=json.dumps(_blocks(page)),
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env=_env(),
    )
    assert proc.returncode == 0, f"{rel} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def test_all_is_the_public_api():
    public = {
        name
        for name in dir(jadeis)
        if not name.startswith("_") and not isinstance(getattr(jadeis, name), types.ModuleType)
    }
    assert len(jadeis.__all__) == len(set(jadeis.__all__)), "duplicates in __all__"
    assert set(jadeis.__all__) == public
    for name in jadeis.__all__:
        assert getattr(jadeis, name).__doc__, f"jadeis.{name} has no docstring"


def test_help_shows_docstrings():
    assert "Sample a diffusion model" in pydoc.render_doc(jadeis.sample, renderer=pydoc.plaintext)
    text = pydoc.render_doc(jadeis, renderer=pydoc.plaintext)
    assert "gradients through diffusion sampling" in text
    for name in ("sample", "solve_adjoint", "DiscreteAdjoint", "VPLinear", "guide"):
        assert name in text


def test_api_reference_covers_all():
    documented = set()
    for page in DOCS.glob("api/*.md"):
        documented |= set(re.findall(r"^::: jadeis\.(\w+)\s*$", page.read_text(), flags=re.M))
    missing = set(jadeis.__all__) - documented
    assert not missing, f"not in docs/api/*.md: {sorted(missing)}"


def test_mkdocs_build_strict(tmp_path):
    missing = [
        m
        for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "pymdownx")
        if importlib.util.find_spec(m.split(".")[0]) is None
        or (m == "mkdocstrings_handlers.python" and importlib.util.find_spec(m) is None)
    ]
    if missing:
        pytest.skip(
            f"the docs extra is not installed (missing {missing}): pip install -e '.[docs]'"
        )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(tmp_path / "site"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**_env(), "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "site" / "api" / "sampling" / "index.html").exists()
