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


# ------------------------------------------------------------------ the layout the README describes
CORE = ("model.py", "diffusion.py", "nara.py", "train.py")


def project_imports(file):
    """The project modules a file imports (top-level names, and extras.<name> as one module each)."""
    import ast
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
    modules = {p.stem for p in ROOT.glob("*.py")}
    modules |= {f"extras.{p.stem}" for p in (ROOT / "extras").glob("*.py")}
    return {m for m in found if m in modules and m != "extras.__init__"}


def test_the_top_level_is_the_design_cards_and_the_core_imports_nothing_from_extras():
    assert sorted(p.name for p in ROOT.glob("*.py")) == sorted(["eval.py", *CORE])
    # the design card's 850 lines, plus model.py's checked reading of config.json and the safetensors shards
    lines = sum(len((ROOT / f).read_text().splitlines()) for f in CORE)
    assert lines <= 930
    assert f"The four are {lines} lines" in " ".join((ROOT / "README.md").read_text().split())
    for f in ("model.py", "diffusion.py", "nara.py"):
        assert not any(m.startswith("extras") for m in project_imports(ROOT / f)), f


def test_the_import_graph_has_no_cycle_no_module_getattr_and_no_private_import():
    files = {p.stem: p for p in ROOT.glob("*.py")}
    files |= {f"extras.{p.stem}": p for p in (ROOT / "extras").glob("*.py") if p.stem != "__init__"}
    graph = {m: project_imports(f) - {m} for m, f in files.items()}
    done, path = set(), []

    def visit(m):
        assert m not in path, f"import cycle: {' -> '.join(path[path.index(m):] + [m])}"
        if m not in done:
            path.append(m)
            for n in graph[m]:
                visit(n)
            path.pop()
            done.add(m)
    for m in graph:
        visit(m)
    for m, f in files.items():
        text = f.read_text()
        assert "def __getattr__(name" not in text, m
        assert not re.search(r"^\s*from [\w.]+ import .*\b_[a-z]", text, re.M), m
