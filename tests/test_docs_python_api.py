"""The runnable Python example of documentation/python_api.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "documentation" / "python_api.md"


def test_the_documented_notebook_example_runs(tmp_path, monkeypatch, one_thread, capsys):
    text = DOC.read_text(encoding="utf-8")
    blocks = re.findall(r"<!-- runnable -->\n```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1, "python_api.md must hold exactly one runnable example"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], str(DOC), "exec"), {"__name__": "__docs__"})
    out = capsys.readouterr().out
    assert "torch.Size([2, 64, 96]) torch.Size([2, 96]) torch.Size([2, 384])" in out
    assert "['README.md', 'adaptation_plan.json', 'checkpoint_final.pth', 'config.json']" in out
    import torch

    ckpt = torch.load(tmp_path / "my_ijepa_encoder" / "checkpoint_final.pth", weights_only=True)
    assert ckpt["training_config"]["ijepa"]["ema_start"] == 0.99 and ckpt["step"] == 20
