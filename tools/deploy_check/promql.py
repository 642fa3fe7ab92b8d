"""Metric names in PromQL expressions, for checking that dashboards and alerts use only exported names.

Not a PromQL parser: it removes what cannot hold a metric name (strings, label matchers, range and
offset durations, grouping clauses, numbers) and keeps the identifiers that are not functions or
keywords. Grafana's variables ($__rate_interval, $__range, $datasource...) are replaced first.
`promtool check rules` checks the syntax separately (monitoring.py), so a malformed expression fails
there rather than being half-read here.
"""

from __future__ import annotations

import re

# Grafana's built-in interval variables, replaced by durations that PromQL accepts.
GRAFANA_DURATIONS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}

_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_DURATION_AFTER_OFFSET = re.compile(r"\boffset\s+-?[0-9a-z]+")
_IDENTIFIER = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(\s*\()?")


def substitute_grafana_variables(expr: str) -> str:
    for variable, duration in GRAFANA_DURATIONS.items():
        expr = expr.replace(variable, duration)
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects (recording-rule names included)."""
    text = substitute_grafana_variables(expr)
    text = _STRING.sub('""', text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _DURATION_AFTER_OFFSET.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name in _KEYWORDS or name in ("inf", "nan", "Inf", "NaN"):
            continue
        names.add(name)
    return names
