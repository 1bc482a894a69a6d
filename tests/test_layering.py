"""The package layering of README.md ("Layout") holds: the import-linter contracts of .importlinter
(one-way layers between the top-level packages, no import cycle between the modules of a package);
and the import style of issue 16: imports at the top of a file, except where one is deferred on
purpose and a comment says so, and no module imports another module's private (_underscore) name."""
import ast
import io
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
PACKAGES = ("mobilemoe", "train", "compiler", "passes", "targets", "tir_kernels", "bench")


def test_import_contracts_hold():
    pytest.importorskip("importlinter", reason="pip install -e '.[test]' (import-linter)")
    proc = subprocess.run([sys.executable, "-c", LINT, "--no-cache", str(ROOT / ".importlinter")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"lint-imports: a contract is broken:\n{proc.stdout[-6000:]}{proc.stderr[-2000:]}"


# ------------------------------------------------------------------------------------ import style

def _comments(source: str) -> tuple[set[int], set[int]]:
    """(lines holding a comment, lines holding nothing but a comment)."""
    anywhere, alone, code = set(), set(), set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            anywhere.add(tok.start[0])
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code.update(range(tok.start[0], tok.end[0] + 1))
    return anywhere, anywhere - code


def undocumented_local_imports(source: str) -> list[int]:
    """Lines of the imports inside a function body that carry no comment (saying why they are deferred)
    on their own lines nor on a comment line right above."""
    anywhere, alone = _comments(source)
    bad = set()
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for n in ast.walk(fn):
                if isinstance(n, (ast.Import, ast.ImportFrom)):
                    if not anywhere & set(range(n.lineno, n.end_lineno + 1)) and n.lineno - 1 not in alone:
                        bad.add(n.lineno)
    return sorted(bad)


def private_imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, "module.name") of each _underscore name that `module` imports from a module of our packages
    (relative imports resolved; dunder names such as __version__ are not private)."""
    package = module if is_package else module.rpartition(".")[0]
    bad = []
    for n in ast.walk(ast.parse(source)):
        if not isinstance(n, ast.ImportFrom):
            continue
        if n.level:
            base = package.split(".")[: len(package.split(".")) - (n.level - 1)]
            src = ".".join(base + ([n.module] if n.module else []))
        else:
            src = n.module or ""
        if src.split(".")[0] not in PACKAGES:
            continue
        bad += [(n.lineno, f"{src}.{a.name}") for a in n.names if a.name.startswith("_") and not a.name.startswith("__")]
    return bad


def _our_files():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            is_package = rel.name == "__init__"
            yield path, ".".join(rel.parent.parts if is_package else rel.parts), is_package


def test_the_import_checks_catch_bad_code():
    assert undocumented_local_imports("import os\n\n\ndef f():\n    import json\n    return json\n") == [5]
    assert undocumented_local_imports("def f():\n    x = 1  # unrelated\n    import json\n") == [3]
    assert undocumented_local_imports("def f():\n    s = '# not a comment'\n    import json\n") == [3]
    assert undocumented_local_imports("class C:\n    def m(self):\n        from a import (b,\n            c)\n") == [3]
    assert undocumented_local_imports("def f():\n    def g():\n        import tvm\n") == [3]
    ok = ("def f():\n    import tvm  # deferred: heavy\n\n\ndef g():\n    # deferred: heavy\n    import tvm\n\n\n"
          "def h():\n    from a import (b,  # deferred: heavy\n                   c)\n")
    assert undocumented_local_imports(ok) == []

    assert private_imports("from train.scaling.law import _ln_neff, features\n", "train.scaling.design") == \
        [(1, "train.scaling.law._ln_neff")]
    assert private_imports("from .softmax import exp_le0, _lane_reduce\n", "tir_kernels.kv_cache") == \
        [(1, "tir_kernels.softmax._lane_reduce")]
    assert private_imports("from .. import _x\n", "compiler.backends.mlir") == [(1, "compiler._x")]
    assert private_imports("from . import _impl\n", "mobilemoe.runtimes", is_package=True) == \
        [(1, "mobilemoe.runtimes._impl")]
    assert private_imports("def f():\n    from bench.roofline import _compile\n", "bench.kv_cache") == \
        [(2, "bench.roofline._compile")]
    fine = ("from __future__ import annotations\nfrom tvm.s_tir.meta_schedule.tune_context import _normalize_mod\n"
            "from mobilemoe import __version__\nfrom .law import ln_neff\n")
    assert private_imports(fine, "train.scaling.design") == []


def test_function_local_imports_say_why_they_are_deferred():
    bad = [f"{path.relative_to(ROOT)}:{line}" for path, _, _ in _our_files()
           for line in undocumented_local_imports(path.read_text())]
    assert not bad, ("imports inside functions without a comment (on the line or a comment line above) saying why "
                     "they are deferred; move cheap ones to the top of the file:\n  " + "\n  ".join(bad))


def test_no_module_imports_another_modules_private_names():
    bad = [f"{path.relative_to(ROOT)}:{line}: {name}" for path, module, is_package in _our_files()
           for line, name in private_imports(path.read_text(), module, is_package)]
    assert not bad, "private names imported across modules (make them public and documented):\n  " + "\n  ".join(bad)
