"""The metric names a PromQL expression reads, for the deployment tests (not a full parser).

A tokenizer that knows enough PromQL to tell a metric name from everything else: function names
(an identifier before ``(``), aggregations (also before ``by``/``without``), label names (inside
``{…}`` and the lists after ``by``, ``without``, ``on``, ``ignoring``, ``group_left``,
``group_right``), keywords and binary operators (``and``, ``or``, ``unless``, ``bool``,
``offset``), durations in ``[…]``, strings and numbers. ``{__name__="x"}`` names ``x``. Grafana's
``$variables`` are taken out first.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<number>(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)(?:ms|[smhdwy])?
       (?:\d+(?:ms|[smhdwy]))*)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<punct>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){}\[\],@:])
    """,
    re.VERBOSE,
)
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*|\[\[[^\]]*\]\]")
_LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "start", "end"}
_AGGREGATIONS = {
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
}


class PromQLError(ValueError):
    pass


def tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise PromQLError(f"cannot read {expr[pos : pos + 20]!r} in {expr!r}")
        pos = m.end()
        kind = m.lastgroup or ""
        if kind not in ("space", "comment"):
            out.append((kind, m.group()))
    return out


def metric_names(expr: str) -> set[str]:
    """Every metric name ``expr`` selects. Grafana variables become a neutral value first (a
    variable where a duration goes becomes a duration; anywhere else, inside strings, a word)."""
    expr = re.sub(r"\[\s*\$\{?__\w+\}?\s*\]", "[5m]", expr)
    expr = _GRAFANA_VARIABLE.sub("x", expr)
    toks = tokens(expr)
    names: set[str] = set()
    depth_braces = depth_brackets = 0
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else ("", "")
        if text == "{":
            depth_braces += 1
        elif text == "}":
            depth_braces -= 1
        elif text == "[":
            depth_brackets += 1
        elif text == "]":
            depth_brackets -= 1
        elif kind == "ident" and depth_braces:
            # a label matcher; {__name__="x"} names a metric
            if text == "__name__" and nxt[1] == "=" and i + 2 < len(toks) and toks[i + 2][0] == "string":
                names.add(toks[i + 2][1][1:-1])
        elif kind == "ident" and not depth_brackets:
            if text in _LABEL_LIST_KEYWORDS:
                if nxt[1] == "(":  # skip the label list
                    j = i + 2
                    while j < len(toks) and toks[j][1] != ")":
                        j += 1
                    i = j
            elif text in _KEYWORDS or text.lower() in _KEYWORDS:
                pass
            elif nxt[1] == "(" or (text in _AGGREGATIONS and nxt[1] in _LABEL_LIST_KEYWORDS):
                pass  # a function, or an aggregation (``sum by (…) (…)``)
            else:
                names.add(text)
        i += 1
    if depth_braces or depth_brackets:
        raise PromQLError(f"unbalanced brackets in {expr!r}")
    return names


def label_values_metric(query: str) -> set[str]:
    """The metric of a Grafana ``label_values(metric{…}, label)`` variable query (none for
    ``label_values(label)``)."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*", query, re.S)
    return metric_names(m.group(1)) if m else set()
