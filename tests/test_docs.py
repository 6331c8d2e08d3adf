"""The reference docs are generated from the code; these tests keep them current."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("generate_reference", ROOT / "docs" / "generate_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("name", "builder"), [("config.md", "config_markdown"), ("cli.md", "cli_markdown")])
def test_reference_docs_are_up_to_date(name, builder):
    expected = getattr(_generator(), builder)()
    actual = (ROOT / "docs" / name).read_text(encoding="utf-8")
    assert actual == expected, f"docs/{name} is stale: run .venv/bin/python docs/generate_reference.py"


def test_every_config_field_is_in_the_config_reference():
    from medseg.config import field_docs

    text = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    missing = [key for key, *_ in field_docs() if f"`{key}`" not in text]
    assert not missing
