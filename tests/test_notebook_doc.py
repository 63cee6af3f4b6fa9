"""docs/notebook.md's examples run as they are: every ```python block, in order, in one namespace."""
from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_notebook_page_examples_run(monkeypatch, capsys):
    pytest.importorskip("pandas")
    blocks = _blocks(os.path.join(ROOT, "docs", "notebook.md"))
    assert len(blocks) >= 3
    monkeypatch.chdir(ROOT)  # the examples read sample_data/ relative to the repository root
    namespace: dict = {"__name__": "notebook_doc"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/notebook.md block {i + 1}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "floor" in out and "top eigenvalues" in out and "alpha" in out
