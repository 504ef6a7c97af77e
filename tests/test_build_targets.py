"""The Bazel BUILD file covers every module and test, and names only files that exist.

Bazel cannot fetch its rules offline here, so this test reads BUILD as Starlark syntax
(a Python subset) instead of running `bazel query`.
"""

import ast
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


def _targets(text=None):
    tree = ast.parse((ROOT / "BUILD").read_text() if text is None else text)
    targets = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("py_library", "py_test"):
            kw = {k.arg: k.value for k in node.keywords}
            name = ast.literal_eval(kw["name"])
            srcs = ast.literal_eval(kw["srcs"]) if "srcs" in kw else []
            deps = [
                ast.literal_eval(d) for d in (kw["deps"].elts if "deps" in kw else []) if isinstance(d, ast.Constant)
            ]
            targets[name] = {"kind": node.func.id, "srcs": srcs, "deps": deps}
    return targets


def _modules_without_target(targets):
    covered = {s for t in targets.values() if t["kind"] == "py_library" for s in t["srcs"]}
    modules = {
        p.relative_to(ROOT).as_posix()
        for root in ("sparse_jax", "pallas_kernels")
        for p in (ROOT / root).rglob("*.py")
    }
    return sorted(modules - covered)


def test_every_module_has_a_library_target():
    missing = _modules_without_target(_targets())
    assert not missing, f"modules without a py_library target in BUILD: {missing}; run tools/gen_build.py"


def test_every_test_file_has_a_test_target():
    tests = {t["srcs"][0] for t in _targets().values() if t["kind"] == "py_test"}
    files = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("test_*.py")}
    missing = sorted(files - tests)
    assert not missing, f"test files without a py_test target in BUILD: {missing}; run tools/gen_build.py"


def test_targets_name_existing_files_and_targets():
    targets = _targets()
    for name, t in targets.items():
        for src in t["srcs"]:
            assert (ROOT / src).is_file(), f"BUILD target {name!r} names missing file {src!r}"
        for dep in t["deps"]:
            if dep.startswith(":"):
                assert dep[1:] in targets, f"BUILD target {name!r} depends on undefined target {dep!r}"


def test_build_is_up_to_date_with_imports():
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_build.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_a_dropped_module_is_detected():
    text = (ROOT / "BUILD").read_text()
    stale = text.replace('"sparse_jax/attention/dense.py",', "")
    assert _modules_without_target(_targets(stale)) == ["sparse_jax/attention/dense.py"]
