"""The documentation: the pages' code runs, what they cite exists, the site builds and shows.

- Every ```python block of docs/ runs, in order, in one fresh namespace per page, in a fresh
  interpreter (JAX's float32 defaults, as a reader would run it: the x64 setting of
  conftest.py does not reach it). A failure reports the page and the line of the markdown
  file. A block that is not a complete program says so in its title
  (```python title="Fragment: ..."); fragments must still parse.
- The files, functions and pages that docs/ and the docstrings cite exist.
- ``jadeis.__all__`` lists exactly the public names, ``help()`` shows the docstrings, and the
  home page names every public solver, gradient strategy and schedule.
- ``mkdocs build --strict`` (warnings are errors) succeeds; skipped when the ``docs`` extra
  is not installed. Its HTML has no TeX left and loads nothing from the network.
- The built site, served on localhost and opened in headless Chromium, shows rendered
  formulas, constructor signatures with defaults, and working links from docstrings to the
  math pages. Skipped only where Chromium and ChromeDriver are not installed (never under CI,
  where .ci/run installs them).
"""

import ast
import functools
import glob
import html
import http.server
import importlib.util
import inspect
import json
import os
import pathlib
import pydoc
import re
import shutil
import subprocess
import sys
import threading
import types

import pytest

import jadeis

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# ```python<options>\n code ```; a runnable block has no options, a fragment a title
# that starts with "Fragment"
PYTHON_BLOCK = re.compile(r"^```python([^\n]*)\n(.*?)^```", flags=re.S | re.M)
FRAGMENT = re.compile(r'^ title="Fragment: [^"]+"$')


def _pages():
    return sorted(DOCS.rglob("*.md"))


def _python_blocks(page):
    """(first line number in the page, fence options, code) of each ```python block."""
    text = page.read_text()
    return [
        (text.count("\n", 0, m.start(2)) + 1, m.group(1), m.group(2))
        for m in PYTHON_BLOCK.finditer(text)
    ]


def _blocks(page):
    """(first line number in the page, code) of each runnable ```python block."""
    return [(line, code) for line, options, code in _python_blocks(page) if not options]


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


def test_python_blocks_run_or_are_marked_fragments():
    """A ```python block either runs in CI (no fence options) or is titled "Fragment: ..."
    (it uses names the reader brings); a fragment still parses."""
    fragments = 0
    for page in _pages():
        for line, options, code in _python_blocks(page):
            where = f"{page.relative_to(ROOT)}:{line}"
            if options:
                assert FRAGMENT.match(options), (
                    f"{where}: a ```python block is runnable (no options) or titled "
                    f'title="Fragment: ...", not {options!r}'
                )
                ast.parse(code, filename=where)
                fragments += 1
    assert fragments >= 2  # docs/diffusers.md and docs/scaling.md


@pytest.mark.parametrize(
    "page", [p for p in _pages() if _blocks(p)], ids=lambda p: str(p.relative_to(DOCS))
)
def test_doc_page_runs(page, tmp_path):

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


def _public_classes(base):
    return [
        name
        for name in jadeis.__all__
        if inspect.isclass(getattr(jadeis, name))
        and issubclass(getattr(jadeis, name), base)
        and not name.startswith("Abstract")
    ]


def test_home_page_names_every_solver_strategy_and_schedule():
    """docs/index.md introduces the library: every public solver, gradient strategy and
    schedule appears there (as `Name`), so a new one cannot be forgotten."""
    text = (DOCS / "index.md").read_text()
    for base in (jadeis.AbstractSolver, jadeis.AbstractAdjoint, jadeis.AbstractSchedule):
        names = _public_classes(base)
        assert names
        missing = [n for n in names if f"`{n}" not in text]
        assert not missing, f"docs/index.md does not mention {missing}"


def test_install_commands_are_real():
    """jadeis is not on a package index: the pages install it from a checkout, and say how to
    build this site."""
    for page in [*_pages(), ROOT / "README.md"]:
        text = page.read_text()
        assert not re.search(r"pip install +['\"]?jadeis\b", text), (
            f"{page.relative_to(ROOT)}: `pip install jadeis` fails (not on a package index)"
        )
    build = 'pip install -e ".[docs]" && mkdocs build --strict'
    for page in (ROOT / "README.md", DOCS / "getting-started.md"):
        assert build in page.read_text(), f"{page.relative_to(ROOT)} lacks {build!r}"


# ---------------------------------------------------------------------------------------
# what the pages cite exists

CODE_DIRS = ("src", "tests", "benchmarks", "examples")
TICKS = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
PATH = re.compile(r"[\w.*-]*(?:/[\w.*-]*)*(?:\.(?:py|md|json|toml|npz)|/)")
IDENT = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
# names that pages call but that belong to other libraries or to the reader's own code
OUTSIDE = {"unet", "net", "set_timesteps", "NoiseScheduleVP", "memory_analysis", "prod"}
OUTSIDE_MODULES = ("jax", "jax.numpy", "jax.random", "jax.sharding", "numpy", "optax")


@functools.lru_cache(maxsize=1)
def _code_index():
    """{defined name: {files}} for every function, class, method, argument and assigned
    name in the code, and the set of all file names under the code folders."""
    names, files = {}, set()
    for d in CODE_DIRS:
        for f in (ROOT / d).rglob("*"):
            files.add(f.name)
            if f.suffix != ".py":
                continue
            for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
                found = []
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    found.append(node.name)
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    a = node.args
                    found += [x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs]]
                elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    found.append(node.id)
                elif isinstance(node, ast.Attribute):
                    found.append(node.attr)
                for name in found:
                    names.setdefault(name, set()).add(f)
    return names, files


def _path_exists(cited: str) -> bool:
    bases = (ROOT, ROOT / "src" / "jadeis", DOCS)
    if any(glob.glob(str(base / cited)) for base in bases):
        return True
    return "/" not in cited and cited in _code_index()[1]  # a file named alone


def _outside(name: str) -> bool:
    if name.split(".")[-1] in OUTSIDE:
        return True
    for module_name in OUTSIDE_MODULES:
        obj = importlib.import_module(module_name)
        for part in name.split(".")[1:] if name.split(".")[0] in ("jax", "jnp", "np") else [name]:
            obj = getattr(obj, part, None)
        if obj is not None:
            return True
    return False


def _citations(text):
    """(cited file paths, called names, "Code:" groups) of a page, code blocks removed; a
    Code: group is (file, [names listed after it in parentheses])."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    paths, calls = [], []
    for m in TICKS.finditer(text):
        tok = m.group(1).strip()
        if PATH.fullmatch(tok) and ("/" in tok or tok.endswith(".py")):
            paths.append(tok)
        calls += re.findall(r"(?<![\w.])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\(", tok)
    groups = []
    for para in re.findall(r"^Code: (.*?)(?:\n\n|\Z)", text, flags=re.S | re.M):
        for file, names in re.findall(r"`([^`]+\.py)`\s*\(((?:`[^`]+`[,\s]*)+)\)", para):
            groups.append((file, re.findall(r"`([^`]+)`", names)))
    return paths, calls, groups


def test_cited_files_and_functions_exist():
    """Every file path the pages cite (`src/jadeis/_x.py`, `tests/test_y.py`, `_z.py`, globs)
    exists; every function they call in inline code is defined in the code (or belongs to JAX,
    NumPy, optax or the reader's model); and each name a math page's "Code:" line lists after
    a file is defined in that file. Docstrings' ``docs/....md#anchor`` references point to
    existing pages and headings."""
    names, _ = _code_index()
    problems = []
    for page in _pages():
        where = page.relative_to(ROOT)
        paths, calls, groups = _citations(page.read_text())
        problems += [f"{where}: no file {p}" for p in paths if not _path_exists(p)]
        problems += [
            f"{where}: nothing defines {c}()"
            for c in calls
            if c.split(".")[-1] not in names and not _outside(c)
        ]
        for file, listed in groups:
            found = [
                f for f in glob.glob(str(ROOT / file)) + glob.glob(str(ROOT / "src/jadeis" / file))
            ]
            if not found:
                problems.append(f"{where}: no file {file}")
                continue
            defined = {n for n, fs in names.items() if any(str(f) in map(str, fs) for f in found)}
            problems += [
                f"{where}: {file} does not define {name}"
                for name in listed
                if name.split(".")[-1] not in defined
            ]
    for f in [*(ROOT / "src").rglob("*.py"), ROOT / "README.md", *_pages()]:
        for target, anchor in re.findall(
            r"\bdocs/((?:[\w-]+/)*[\w-]+\.md)(?:#([\w-]+))?", f.read_text()
        ):
            page = DOCS / target
            if not page.is_file():
                problems.append(f"{f.relative_to(ROOT)}: no page docs/{target}")
            elif anchor and anchor not in _anchors(page):
                problems.append(f"{f.relative_to(ROOT)}: docs/{target} has no #{anchor}")
    assert not problems, "\n".join(problems)


@functools.cache
def _anchors(page):
    """The heading ids of a page: explicit {#id} attributes, else the toc extension's slug."""
    from markdown.extensions.toc import slugify

    ids = set()
    for heading in re.findall(r"^#+ (.*)$", page.read_text(), flags=re.M):
        explicit = re.search(r"\{#([\w-]+)\}\s*$", heading)
        ids.add(explicit.group(1) if explicit else slugify(heading.strip(), "-"))
    return ids


# ---------------------------------------------------------------------------------------
# the site

DOCS_EXTRA = (
    "mkdocs",
    "material",
    "mkdocstrings",
    "mkdocstrings_handlers.python",
    "pymdownx",
    "math_core",
    "ziamath",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site built with ``mkdocs build --strict`` (once per test process)."""
    missing = [
        m
        for m in DOCS_EXTRA
        if importlib.util.find_spec(m.split(".")[0]) is None or importlib.util.find_spec(m) is None
    ]
    if missing:
        pytest.skip(
            f"the docs extra is not installed (missing {missing}): pip install -e '.[docs]'"
        )
    out = tmp_path_factory.mktemp("docs") / "site"
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
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**_env(), "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def test_mkdocs_build_strict(site):
    assert (site / "api" / "sampling" / "index.html").exists()
    assert (site / "stylesheets" / "fonts" / "STIXTwoMath-Regular.ttf").stat().st_size > 500_000


def test_site_has_mathml_and_needs_no_network(site):
    """No TeX is left for a script to typeset (the formulas are MathML), and no page loads a
    script, style sheet, font or image from another host."""
    pages = sorted(site.rglob("*.html"))
    external = re.compile(
        r"""<(?:script|img|iframe|source)\b[^>]*\bsrc=["']?(?:https?:)?//"""
        r"""|<link\b[^>]*\bhref=["']?(?:https?:)?//[^>]*>"""
    )
    math_pages = 0
    for page in pages:
        text = page.read_text()
        rel = page.relative_to(site)
        assert 'class="arithmatex"' not in text, f"{rel}: TeX left unconverted"
        for tag in external.findall(text):
            assert 'rel="canonical"' in tag or "rel=canonical" in tag, f"{rel}: loads {tag}"
        math_pages += "<math" in text
    assert math_pages >= 10
    for css in site.rglob("*.css"):
        assert not re.search(
            r"@import\s+url\([\"']?https?:|url\([\"']?https?://", css.read_text()
        ), css


def _is_literal(value) -> bool:
    try:
        return ast.literal_eval(repr(value)) == value
    except (ValueError, SyntaxError):
        return False


def test_every_class_has_a_constructor_signature(site):
    """Each concrete public class shows ``Name(arg=default, ...)`` with the defaults Python
    reports, on the API page that documents it (the signatures of equinox Modules are made
    by docs/hooks/griffe_signatures.py)."""
    api = {}  # raw HTML -> text of the object's section
    for page in site.glob("api/*/index.html"):
        raw = page.read_text()
        for section in re.split(r'(?=<div class="doc doc-object doc-class">)', raw)[1:]:
            api[section[:300]] = html.unescape(re.sub(r"<[^>]+>", "", section))
    checked = 0
    for name in jadeis.__all__:
        cls = getattr(jadeis, name)
        if not inspect.isclass(cls) or name.startswith("Abstract") or inspect.isabstract(cls):
            continue
        text = next((v for k, v in api.items() if f'id="jadeis.{name}"' in k), None)
        assert text is not None, f"jadeis.{name} is on no API page"
        params = inspect.signature(cls).parameters.values()
        flat = re.sub(r"\s+", "", text).replace("'", '"')
        assert re.sub(r"\s+", "", f"{name}(") in flat, f"no signature for {name}"
        for p in params:
            # literal defaults; an object default (a solver) shows as its __init__ writes it
            if p.default is not inspect.Parameter.empty and _is_literal(p.default):
                shown = re.sub(r"\s+", "", f"{p.name}={p.default!r}").replace("'", '"')
                assert shown in flat, f"{name}: {shown} is not shown"
        checked += 1
    assert checked >= 25


# ---------------------------------------------------------------------------------------
# the site in a browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,1000",
)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def browser(site, tmp_path_factory):
    """(Chromium driven by ChromeDriver, the site's URL on localhost)."""
    if not (CHROMIUM and CHROMEDRIVER):
        reason = (
            "Chromium and ChromeDriver are not installed (Debian: apt-get install chromium "
            "chromium-driver; .ci/run installs them)"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must open the site in a browser")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium')}")
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()


_MATH_STATE = """
const maths = [...document.querySelectorAll('math')];
const frac = document.querySelector('mfrac');
let stacked = null;
if (frac) {
  const [num, den] = [...frac.children].map(e => e.getBoundingClientRect());
  stacked = num.bottom <= den.top + 1;  // laid out as a fraction, not as text in a row
}
await document.fonts.ready;
return {
  count: maths.length,
  displays: maths.map(m => getComputedStyle(m).display),
  empty: maths.filter(m => m.getBoundingClientRect().width === 0).length,
  stacked: stacked,
  text: document.body.innerText,
  font: [...document.fonts].filter(f => f.family.includes('STIX Two Math')).map(f => f.status),
  resources: performance.getEntriesByType('resource').map(r => r.name),
};
"""


def _open(driver, url):
    """Load ``url`` and wait until the document and everything it loads are complete (the
    WebDriver's own wait sometimes returns while the page is still being parsed)."""
    driver.get(url)
    _run_async(
        driver,
        "if (document.readyState !== 'complete')"
        "  await new Promise(r => window.addEventListener('load', r));",
    )


def _run_async(driver, script, *args):
    """Run ``script`` (the body of an async function; ``arguments[0]`` is ``args[0]``) in the
    page and return its result."""
    return driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"(async (...arguments) => {{ {script} }})(...arguments)"
        ".then(done, e => done({error: String(e)}));",
        *args,
    )


def test_site_in_a_browser(browser, site):
    """Opened in headless Chromium: every math page shows MathML laid out as math (fractions
    stacked, the STIX Two Math font loaded from the site) with no raw TeX in its text; the API
    pages show signatures with defaults, none wider than its box; every docstring link to a
    docs page resolves; and nothing is fetched from another host."""
    driver, url = browser
    for page in sorted((site / "math").rglob("index.html")):
        path = page.parent.relative_to(site).as_posix()
        _open(driver, f"{url}/{path}/")
        state = _run_async(driver, _MATH_STATE)
        assert "error" not in state, state
        assert state["count"] > 0 and state["empty"] == 0, (path, state["count"], state["empty"])
        assert set(state["displays"]) <= {"math", "block math", "inline math"}, state["displays"]
        assert state["stacked"] in (True, None), path
        for raw in ("\\(", "\\[", "\\frac", "\\alpha", "$$"):
            assert raw not in state["text"], f"{path}: raw TeX {raw!r} is visible"
        assert state["font"] == ["loaded"], (path, state["font"])
        assert all(r.startswith(url) for r in state["resources"]), state["resources"]

    _open(driver, f"{url}/api/gradients/")
    signatures = [e.text for e in driver.find_elements("css selector", ".doc-signature")]
    assert any(
        s.startswith('AdjointDEIS(order=2, steps=None, trajectory="cached"') for s in signatures
    ), signatures
    _open(driver, f"{url}/api/schedules/")
    text = driver.find_element("tag name", "body").text
    assert "VPLinear(t_min=0.001, t_max=1.0, beta_min=0.1, beta_max=20.0)" in text

    links = {}  # href (as the browser resolves it) -> where it is
    for api_page in sorted(site.glob("api/*/index.html")):
        path = api_page.parent.relative_to(site).as_posix()
        _open(driver, f"{url}/{path}/")
        wide = driver.execute_script(
            "return [...document.querySelectorAll('.doc-signature code')]"
            ".filter(c => c.scrollWidth > c.clientWidth).map(c => c.textContent)"
        )
        assert not wide, f"{path}: signatures wider than their box at 1280 px: {wide}"
        found = driver.execute_script(
            "return [...document.querySelectorAll('a')]"
            ".filter(a => a.textContent.startsWith('docs/')).map(a => [a.href, a.textContent])"
        )
        links.update({href: f"{path}: {text}" for href, text in found})
    assert sum("docs/math/" in v for v in links.values()) >= 5, links
    resolved = _run_async(
        driver,
        """
        const out = {};
        for (const href of arguments[0]) {
          const response = await fetch(href);
          const doc = new DOMParser().parseFromString(await response.text(), 'text/html');
          const anchor = decodeURIComponent(new URL(href).hash.slice(1));
          out[href] = response.ok && (!anchor || doc.getElementById(anchor) !== null);
        }
        return out;
        """,
        sorted(links),
    )
    broken = [f"{links[h]} -> {h}" for h, ok in resolved.items() if not ok]
    assert len(resolved) == len(links) and not broken, broken
