"""Every nnssl command in the documentation parses: the docs cannot rot.

Each `nnssl_*` line in a fenced code block (synopsis lines with `[optional]` parts aside) of
README.md and documentation/*.md is split like a shell would (variables and `$(...)` left as
words), handed to that command's real argument parser, and must parse (the command's body is
not run; the end-to-end tests run the commands themselves). A documented flag that was renamed or removed fails here.
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
DOCS = [ROOT / "README.md", *sorted((ROOT / "documentation").glob("*.md"))]


def _code_lines(path: Path) -> list[str]:
    lines, inside, pending = [], False, ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.strip().startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        line = pending + raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line.strip():
            lines.append(line.strip())
    return lines


def _invocations() -> list[tuple[str, str, list[str]]]:
    found = []
    for path in DOCS:
        for line in _code_lines(path):
            if "[" in line:  # a synopsis with [optional] parts, not a runnable example
                continue
            words = shlex.split(line.replace("$(which ", "").replace(")", " "), posix=True)
            for i, word in enumerate(words):
                if word in SCRIPTS:
                    args = []
                    for w in words[i + 1:]:
                        if w in ("|", "&&", "&", ";", ">", "2>"):
                            break
                        args.append(w)
                    found.append((path.name, word, args))
                    break
    return found


INVOCATIONS = _invocations()


def test_the_docs_show_every_command():
    shown = {name for _, name, _ in INVOCATIONS}
    missing = sorted(set(SCRIPTS) - shown)
    assert not missing, f"commands without an example in the docs: {missing}"


@pytest.mark.parametrize("doc,name,args", INVOCATIONS, ids=[f"{d}:{n}:{' '.join(a)[:40]}" for d, n, a in INVOCATIONS])
def test_documented_command_parses(doc, name, args, monkeypatch):
    module_name, func_name = SCRIPTS[name].split(":")
    module = importlib.import_module(module_name)
    parsed = {}

    def parse_only(parser, body, argv=None):
        parsed["args"] = parser.parse_args(argv)
        return 0

    monkeypatch.setattr(module, "run_cli", parse_only)
    args = [re.sub(r"^\.\.\.$", "x", a) for a in args]
    assert getattr(module, func_name)(args) == 0, f"{doc}: {name} {' '.join(args)}"
    assert "args" in parsed
