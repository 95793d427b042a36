"""docs/errors.md matches what the commands print today.

The test reruns tools/errors_doc.py into a temporary file. When a message changes, this
test fails, and the fix is to regenerate the page:

    PYTHONPATH=. .venv/bin/python tools/errors_doc.py
"""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_fashion_mnist

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_errors_doc_is_current(tmp_path):
    require_fashion_mnist()
    generated = tmp_path / "errors.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "errors_doc.py"), "-o", str(generated)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr

    committed = (ROOT / "docs" / "errors.md").read_text(encoding="utf-8")
    fresh = generated.read_text(encoding="utf-8")
    diff = "".join(difflib.unified_diff(committed.splitlines(keepends=True), fresh.splitlines(keepends=True),
                                        "docs/errors.md", "regenerated", n=1))
    assert fresh == committed, (
        "docs/errors.md is out of date; run `PYTHONPATH=. .venv/bin/python tools/errors_doc.py`:\n" + diff
    )
