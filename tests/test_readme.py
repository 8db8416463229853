"""The README's Python snippets run as written, from the repository root, on CPU."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_python_snippet_in_the_readme_runs(tmp_path):
    snippets = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(snippets) >= 3
    (tmp_path / "data").symlink_to(ROOT / "data")                         # relative paths as from the root
    for i, code in enumerate(snippets):
        res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, f"snippet {i}:\n{code}\n{res.stderr[-2000:]}"
