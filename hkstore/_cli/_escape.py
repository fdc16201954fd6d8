"""Escaping what the command prints: nothing read from an archive reaches a terminal raw."""

from __future__ import annotations

__all__ = ["printable"]


def printable(text: str) -> str:
    r"""``text`` with every character a terminal could act on escaped, newlines kept.

    Archives carry text chosen by whoever wrote them (tensor names, versions, pickle
    globals, metadata); written raw, escape sequences could move the cursor, erase the line
    that shows ``posix.system``, retitle the window, or reorder text (bidirectional
    overrides). Every character that is not printable (``str.isprintable``: control,
    format, surrogate, private-use, unassigned, line and paragraph separators) becomes
    ``\xNN``, ``\uNNNN`` or ``\UNNNNNNNN``, as in Python's ``repr``.

    Example:
        >>> print(printable("ok\x1b[2Kfake\u202e\nnext"))
        ok\x1b[2Kfake\u202e
        next
    """
    if text.isprintable():
        return text
    return "\n".join(line if line.isprintable() else _escape_line(line)
                     for line in text.split("\n"))


def _escape_line(line: str) -> str:
    out = []
    for ch in line:
        if ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else
                       f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)
