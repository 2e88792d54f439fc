"""The metric names a PromQL expression reads (enough PromQL for dashboards: no subqueries)."""
from __future__ import annotations

import re

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless"}


def metric_names(expr: str) -> set[str]:
    e = re.sub(r'"[^"]*"', "", expr)  # string literals
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*", e):  # not the unit of 5m
        if m.group() not in KEYWORDS and not e[m.end():].lstrip().startswith("("):  # not a function
            names.add(m.group())
    return names
