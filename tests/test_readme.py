"""The README's "RAG in production" example runs as written (with the real MiniLM model)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def rag_example():
    text = README.read_text(encoding="utf-8")
    section = text.split("## RAG in production", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the section should hold one python example"
    return blocks[0]


@pytest.mark.model
def test_readme_rag_example_runs(tmp_path, monkeypatch, minilm, capsys):
    import pyknn.embed
    # The example loads the model itself; reuse the session's copy (the same weights).
    monkeypatch.setattr(pyknn.embed, "load_minilm", lambda **kw: minilm)
    monkeypatch.chdir(tmp_path)
    exec(compile(rag_example(), str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[1, 0]"
    assert out[1].startswith("refused:") and "some-other-model@1" in out[1]
    assert out[2] == "[5, 3, 2]"
    assert len(out) == 5 and "kitten" in out[3] + out[4]
