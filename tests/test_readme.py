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
    for f in ("model.py", "diffusion.py", "nara.py"):
        assert not any(m.startswith("extras") for m in project_imports(ROOT / f)), f


def project_files():
    """The project's own modules: the top level, extras/ and benchmarks/."""
    return [*ROOT.glob("*.py"), *(ROOT / "extras").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]


def test_no_module_hooks_into_a_forward_or_replaces_one():
    """Every value a forward needs travels as an argument: no forward (pre-)hooks, no replaced `forward`
    in the library (the top level and extras/; benchmarks/run.py's memory table observes modules with
    hooks, which compute nothing)."""
    import ast
    for f in [*ROOT.glob("*.py"), *(ROOT / "extras").glob("*.py")]:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("register_forward_hook",
                                                                 "register_forward_pre_hook"):
                raise AssertionError(f"{f.name}:{node.lineno} registers a forward hook")
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Attribute) and t.attr == "forward"
                                                    for t in node.targets):
                raise AssertionError(f"{f.name}:{node.lineno} assigns a module's forward")


# each mechanism, by the name it is defined under, and where: exactly once in the project
MECHANISMS = {"add_adapters": "nara.py",           # the one factory (every method registers in METHODS)
              "replace_linears": "nara.py",        # the one place layers are swapped
              "target_of": "nara.py",              # the one rule a layer name matches a target by
              "check_options": "nara.py",          # the one check of adapter options
              "conditioning": "model.py",          # the one way a core gets its inputs
              "load_state": "adapters.py",         # the one loader of adapter tensors
              "check_args": "train.py",            # the one check of train.py's flags
              "parse_args": None}                  # train.py's and eval.py's: one per command


def test_each_mechanism_is_defined_once():
    import ast
    defined = {}
    for f in project_files():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.setdefault(node.name, []).append(f.name)
    for name, where in MECHANISMS.items():
        if where:
            assert defined.get(name) == [where], (name, defined.get(name))
    assert sorted(defined["parse_args"]) == ["eval.py", "train.py"]
    assert sorted(defined["Hypernetwork"]) == ["ablations.py", "nara.py"]   # the ablations' subclasses nara's
    from extras import ablations
    import nara
    assert issubclass(ablations.Hypernetwork, nara.Hypernetwork)
    for gone in ("attach", "AdapterConfig", "check_flags", "from_flags", "watch_input", "identity_cores"):
        assert gone not in defined, (gone, defined.get(gone))
    assert "replace_linears(model" not in "".join(f.read_text() for f in project_files()
                                                 if f.name != "nara.py")


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
