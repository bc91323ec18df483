"""The handler registry: entry points of an installed package, option docs, ``list``."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
import uuid

import passes_handlers
import pytest

import torchgraft as tg
from torchgraft.cli import describe_handler
from torchgraft.handlers.options import option_docs
from torchgraft.handlers.registry import UnknownHandlerError, reload_entry_points


def _pip(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
        check=True,
        capture_output=True,
        timeout=300,
    )


def test_an_installed_package_adds_handlers_through_entry_points(tmp_path):
    tag = uuid.uuid4().hex[:8]
    module, dist = f"tg_plugin_{tag}", f"tg-plugin-{tag}"
    good, broken = f"plugin_relu_{tag}", f"plugin_broken_{tag}"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            """
            import torch
            import torchgraft as tg

            class ReluToGelu(tg.Handler):
                '''relu -> gelu, from an installed package.'''

                @tg.rule
                def relu(x):
                    return torch.ops.aten.relu.default(x)

                @relu.replacement
                def _(x):
                    return torch.ops.aten.gelu.default(x)
            """
        )
    )
    (tmp_path / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [build-system]
            requires = ["setuptools"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{dist}"
            version = "0.0.1"

            [tool.setuptools]
            py-modules = ["{module}"]

            [project.entry-points."torchgraft.handlers"]
            {good} = "{module}:ReluToGelu"
            {broken} = "{module}:DoesNotExist"
            """
        )
    )
    with pytest.raises(UnknownHandlerError):
        tg.get_handler(good)
    _pip("install", "--no-deps", "--no-build-isolation", "--no-index", str(tmp_path))
    try:
        reload_entry_points()
        cls = tg.get_handler(good)
        assert cls.__name__ == "ReluToGelu" and cls.name == good
        assert [r.name for r in cls.rules()] == ["relu"]
        assert tg.PassManager([{good: {"optional": True}}]).problems == []
        with pytest.raises(UnknownHandlerError, match="failed to load: AttributeError"):
            tg.get_handler(broken)
        assert good in tg.registered()  # the broken one does not hide the others
    finally:
        _pip("uninstall", "-y", dist)
        reload_entry_points()


def test_option_docs_come_from_the_strings_under_the_fields():
    docs = option_docs(passes_handlers.TLowPrecision.Options)
    assert [(d.name, d.type, d.default, d.doc) for d in docs] == [
        ("dtype", "'bfloat16' | 'float16'", "'bfloat16'", "Dtype the GEMM runs in."),
        ("skip_output", "bool", "False", "Keep the output projection in float32."),
    ]

    @dataclasses.dataclass(kw_only=True)
    class Base:
        shared: list[str] = dataclasses.field(default_factory=list)
        """Inherited
        over two lines."""

    @dataclasses.dataclass(kw_only=True)
    class Options(Base):
        required: int
        undocumented: float = 1.0

    docs = option_docs(Options)
    assert [(d.name, d.default, d.doc) for d in docs] == [
        ("shared", "[]", "Inherited\nover two lines."),
        ("required", "(required)", ""),
        ("undocumented", "1.0", ""),
    ]


def test_list_entry_shows_rules_options_and_order():
    text = describe_handler("t_low_precision_tolerant", passes_handlers.TLowPrecisionTolerant)
    assert "t_low_precision_tolerant  (passes_handlers.TLowPrecisionTolerant)" in text
    assert "sqnr tolerance: 20.0 dB" in text
    assert "linear  aten.linear.default  (" in text and "passes_handlers.py:" in text
    assert "dtype: 'bfloat16' | 'float16' = 'bfloat16'\n        Dtype the GEMM runs in." in text
    text = describe_handler("t_needs_rms", passes_handlers.TNeedsRMS)
    assert "order: requires t_fuse_rms" in text and "sqnr tolerance: exact" in text
    assert "options: none" in text


def test_built_ins_survive_a_replaced_registry(monkeypatch):
    """The built-in modules register on import, once. A registry replaced afterwards (a
    test's copy taken before the first import, put back) gets them again from the classes:
    before, the whole suite saw 'unknown handler 'float8' (known: none)' after such a test."""
    from torchgraft.handlers import registry

    monkeypatch.setattr(registry, "_REGISTRY", {})
    assert tg.get_handler("float8").name == "float8"
    assert {"float8", "int8", "mx", "bitnet", "flex_attention", "lora"} <= set(
        registry.registered()
    )
