"""docs/modules.md's table of every module (benchmarks/module_cost.py --table) covers the registry."""
import re
from pathlib import Path

import attnlab
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    return load_benchmark("module_cost")


def test_every_registered_module_has_a_source_and_a_row():
    script = load_script()
    assert set(script.SOURCES) == set(attnlab.attention.names())
    for name, (paper, code, timm_kind) in script.SOURCES.items():
        if timm_kind != "-":
            attnlab.attention.get(timm_kind)  # a real, slot-fitting timm kind
    text = (ROOT / "docs" / "modules.md").read_text()
    table = text.split(script.BEGIN, 1)[1].split(script.END, 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \|", table, re.M)
    assert sorted(rows) == attnlab.attention.names()
    assert "defaults" in table and "R-50" in table
