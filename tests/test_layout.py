"""csrc/kd_layout.h mirrors the Python definitions of the row-statistics table and of the
spec's primitive arguments: the C++ enum Stat must list kdkernels._stats.Col in order (as
ST_<name>) with NSTAT == NCOL, and struct Params must hold LossSpec.as_args() in order."""

from __future__ import annotations

import re
from pathlib import Path

from kdkernels._spec import Divergence, LossSpec
from kdkernels._stats import NCOL, Col

HEADER = Path(__file__).resolve().parent.parent / "csrc" / "kd_layout.h"


def _body(text: str, opener: str) -> str:
    m = re.search(re.escape(opener) + r"[^{]*\{(.*?)\};", text, re.S)
    assert m, f"{opener} not found in {HEADER}"
    return re.sub(r"//[^\n]*", "", m.group(1))  # comments out


def test_stat_enum_matches_col():
    names = re.findall(r"\b(ST_\w+|NSTAT)\b(?:\s*=\s*(\d+))?", _body(HEADER.read_text(),
                                                                      "enum Stat"))
    assert names[-1][0] == "NSTAT", "NSTAT must close the enum (it counts the columns)"
    cols = [n for n, _ in names[:-1]]
    assert cols == [f"ST_{c.name}" for c in Col]
    # an explicit value may only restate the position
    for i, (_, v) in enumerate(names[:-1]):
        assert v in ("", str(i))
    assert len(cols) == NCOL


def test_params_fields_match_as_args():
    body = _body(HEADER.read_text(), "struct Params")
    fields = []
    for decl in body.split(";"):
        decl = decl.strip()
        if not decl:
            continue
        _, names = decl.split(None, 1)
        fields += [n.strip() for n in names.split(",")]
    # as_args() order, by the LossSpec / Divergence attribute each argument comes from
    spec = LossSpec(Divergence("mixture", mix=0.25, coef_p=0.5, coef_q=0.75), inv_ts=2.0,
                    inv_tt=3.0, kd_scale=4.0, ce_weight=5.0, ignore_index=-7)
    by_value = {"mixture": "kind", 0.25: "mix", 0.5: "coef_p", 0.75: "coef_q", 2.0: "inv_ts",
                3.0: "inv_tt", 4.0: "kd_scale", 5.0: "ce_weight", -7: "ignore_index"}
    assert fields == [by_value[a] for a in spec.as_args()]
