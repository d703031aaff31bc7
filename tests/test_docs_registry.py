"""The docs' tables of methods and backbones are the registries' own output (no second list).

`python tests/test_docs_registry.py` rewrites the tables in place after a registry change."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "documentation" / "training.md"


def with_tables(text: str) -> str:
    from nnssl.training.names import registry_tables

    for name, table in registry_tables().items():
        pattern = re.compile(rf"(<!-- registry:{name} -->\n).*?(<!-- /registry:{name} -->)", re.S)
        if not pattern.search(text):
            raise AssertionError(f"{DOC} lacks the markers <!-- registry:{name} --> ... <!-- /registry:{name} -->")
        text = pattern.sub(lambda m, table=table: m.group(1) + table + "\n" + m.group(2), text)
    return text


def test_training_docs_list_exactly_the_registered_methods_and_backbones():
    text = DOC.read_text(encoding="utf-8")
    assert text == with_tables(text), f"the registry tables in {DOC} are stale: run python {__file__}"


if __name__ == "__main__":
    DOC.write_text(with_tables(DOC.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"updated {DOC}")
