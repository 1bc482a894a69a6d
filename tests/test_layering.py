"""The package layering of README.md ("Layout") holds: the import-linter contracts of .importlinter
(one-way layers between the top-level packages, no import cycle between the modules of a package)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def test_import_contracts_hold():
    pytest.importorskip("importlinter", reason="pip install -e '.[test]' (import-linter)")
    proc = subprocess.run([sys.executable, "-c", LINT, "--no-cache", str(ROOT / ".importlinter")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"lint-imports: a contract is broken:\n{proc.stdout[-6000:]}{proc.stderr[-2000:]}"
