"""The README's Python code blocks are executed as they stand."""

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_code():
    assert len(_python_blocks()) >= 1


def test_readme_python_blocks_run(tmp_path):
    # Each block runs in a fresh interpreter (default float32, as a user would run it).
    for i, block in enumerate(_python_blocks()):
        script = tmp_path / f"block_{i}.py"
        script.write_text(block)
        proc = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path
        )
        assert proc.returncode == 0, f"README block {i} failed:\n{proc.stdout}\n{proc.stderr}"
