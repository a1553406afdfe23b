"""Text from outside (file and class names, hyperparameter values, HTTP input) as logs and failure reasons show it.

SageMaker reads the job's metrics by matching regular expressions (`validation:acc_1=([0-9.]+)`, ...) against
every log line, so a class folder named `x\\nvalidation:acc_1=99.9` would forge the tuner's objective and the
buyer's chart, and a right-to-left override would make a log line read differently from what it says. What
the log shows of such text is therefore one line, escaped, bounded, and never a metric: control, format
(bidi) and separator characters become `\\n`, `\\x1b`, `\\u202e`; the `=` after a metric's name becomes `\\x3d`;
bytes that are not UTF-8 become `\\xNN`. Files (labels.json, answers, args.yml) keep the real text.
"""

from __future__ import annotations

import re
import unicodedata

from .metrics import METRIC_NAMES  # SageMaker's patterns are `<name>=([0-9.]+)`

_METRIC = re.compile("(" + "|".join(re.escape(name) for name in METRIC_NAMES) + ")=", re.IGNORECASE)
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})
# Entries of a list the log shows (classes, their counts, the settings' lists): 1,000 classes made 10 KB lines and
# 3,000 lines of settings. args.yml keeps every entry.
LOG_LIST_MAX = 24


def is_unsafe(character: str) -> bool:
    """Control, format (bidi overrides, zero-width), line/paragraph separators, surrogates (undecodable bytes),
    private-use and unassigned characters."""
    return unicodedata.category(character) in UNSAFE_CATEGORIES


LABEL_RULE = ("A class name (its folder's name) may hold any printable Unicode text (letters of any script, digits, "
              "spaces, punctuation, emoji), but no control, format (bidi, zero-width) or line-separator characters, "
              "no bytes that are not UTF-8, and none of the metric names (" + ", ".join(METRIC_NAMES) + "), which "
              "SageMaker reads from the log.")


def is_label(name: str) -> bool:
    """Whether a class folder's name may become a label (LABEL_RULE): labels go into answers, labels.json and log
    lines as they are."""
    return (bool(name) and not any(is_unsafe(c) for c in name)
            and not any(metric.lower() in name.lower() for metric in METRIC_NAMES))


def _escaped(character: str) -> str:
    if character in _ESCAPES:
        return _ESCAPES[character]
    code = ord(character)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, kept by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def shown(value: object, limit: int = 200) -> str:
    """`value` as one safe line of at most about `limit` characters (the cut says how long it was)."""
    text = value if isinstance(value, str) else str(value)
    cut = len(text) > limit
    head = text[:limit]
    head = "".join(_escaped(c) if is_unsafe(c) else c for c in head)
    head = _METRIC.sub(lambda match: match.group(1) + "\\x3d", head)
    return f"{head}... ({len(text):,} characters in all)" if cut else head


def listed(entries) -> str:
    """Entries (already made safe) joined for one log line, cut after LOG_LIST_MAX with the count of all."""
    entries = list(entries)
    head = ", ".join(entries[:LOG_LIST_MAX])
    return head + (f", ... ({len(entries):,} in all, each in args.yml)" if len(entries) > LOG_LIST_MAX else "")


def shown_lines(text: str, line_limit: int = 1000) -> str:
    """Text the program laid out in lines (a YAML dump, a table) that holds outside text: each line made safe and
    cut at `line_limit` characters (a 1 MB hyperparameter name would otherwise be one log line), the program's own
    line breaks kept."""
    return "\n".join(shown(line, line_limit) for line in text.split("\n"))


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(text: str) -> str:
    """Outside text as a CSV cell that a spreadsheet shows as text: one starting with =, +, -, @, tab or carriage
    return would run as a formula there (`=HYPERLINK(...)`, `@SUM(1+1)*cmd|'`), so it gets OWASP's leading '.
    Only the CSV cell changes: labels.json and answers keep the real name."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text
