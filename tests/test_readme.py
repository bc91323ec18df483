"""The README's first example runs and prints what it says."""

from __future__ import annotations

import re
from pathlib import Path

import torchgraft as tg
from torchgraft.handlers import registry

README = Path(tg.__file__).parent / "README.md"


def test_readme_rule_example_runs(capsys, monkeypatch):
    text = README.read_text()
    section = text[text.index("## Writing a conversion") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # keep it local
    exec(compile(code, str(README), "exec"), {})
    assert capsys.readouterr().out.strip() == "{'relu_to_gelu': 1}"
