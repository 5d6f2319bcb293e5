"""The README's Python examples run as written."""

from __future__ import annotations

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _python_blocks() -> list[str]:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("code", _python_blocks() or [pytest.param("", marks=pytest.mark.skip("no examples"))])
def test_readme_example_runs(code):
    assert code.strip()
    exec(compile(code, README, "exec"), {"__name__": "readme_example"})
