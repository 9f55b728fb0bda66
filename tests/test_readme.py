"""The README's "use your own model" example works as written."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import dsgd
from tests.conftest import ROOT


def test_readme_model_example_trains(tmp_path: Path, monkeypatch) -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    module = next(b for b in blocks if b.startswith("# mymodel.py"))
    (tmp_path / "mymodel.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mymodel", None)
    mymodel = importlib.import_module("mymodel")
    result = dsgd.train(mymodel.iris(), num_workers=2, num_shards=2, target_accuracy=0.9)
    assert result.summary["reached_target"], result.summary
    assert set(result.params) == {"w1", "b1", "w2", "b2"}
    assert result.history[-1]["test_accuracy"] >= 0.9
