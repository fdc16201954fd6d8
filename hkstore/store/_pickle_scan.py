"""Static pickle inspection: the globals a pickle would import, read from its opcodes, never run.

A pickle imports code through three opcodes: ``GLOBAL`` and ``INST`` (module and name in the
opcode's argument) and ``STACK_GLOBAL`` (module and name popped from the stack, where they may
have been pushed by a string opcode *or fetched from the memo*). A scan that ignores the memo
resolves ``STACK_GLOBAL`` to the wrong strings, and a pickle can be crafted so that such a scan
reports a harmless name while the real unpickler imports ``os.system``. This module therefore
replays the unpickler's stack, mark stack and memo exactly as ``pickle.py`` does, tracking the
value of every string constant and treating every other value as opaque. Nothing is imported,
constructed or called: only :func:`pickletools.genops` decodes the bytes.

A ``STACK_GLOBAL`` whose operands are not both known strings (computed by a ``REDUCE``, say),
and every ``EXT1/EXT2/EXT4`` (resolved at load time through :mod:`copyreg`'s extension
registry), is reported as :data:`UNRESOLVED`: callers must treat it as dangerous.

The listing is for *showing* an operator what a pickle would import (``hkstore inspect``) and
for recognising declearn's by-reference function pickles; it is not a safety check. A pickle
that lists only harmless names can still do harm (cloudpickle rebuilds functions from
bytecode), which is why hkstore unpickles only signed blobs the caller opted in to.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickletools
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

from hkstore.errors import ArchiveFormatError, LimitExceededError

__all__ = ["DEFAULT_MAX_OPS", "UNRESOLVED", "is_plain_global_reference", "pickle_globals"]

#: What :func:`pickle_globals` reports for an import it cannot resolve statically.
UNRESOLVED = "<unresolved>"

#: Default cap on the number of opcodes walked (a cloudpickle blob of a model and loss
#: function is a few thousand opcodes; the cap bounds the time spent on hostile input).
DEFAULT_MAX_OPS = 5_000_000

# Opcodes that push the value of a string constant (``str`` once loaded with the default
# ``encoding="ASCII"``, which is how cloudpickle and pickle load).
_STRING_OPS = frozenset(
    {
        "STRING",
        "BINSTRING",
        "SHORT_BINSTRING",
        "UNICODE",
        "BINUNICODE",
        "SHORT_BINUNICODE",
        "BINUNICODE8",
    }
)
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_EXT_OPS = frozenset({"EXT1", "EXT2", "EXT4"})
# The only opcodes a plain by-reference pickle of one function is made of.
_PLAIN_REFERENCE_OPS = (
    _STRING_OPS
    | _PUT_OPS
    | _GET_OPS
    | {
        "PROTO",
        "FRAME",
        "MEMOIZE",
        "GLOBAL",
        "STACK_GLOBAL",
        "STOP",
    }
)
_PLAIN_REFERENCE_MAX_OPS = 64

# Errors pickletools raises on bytes it cannot decode (truncation, unknown opcode, bad
# escapes or UTF-8, oversized decimal ints); wrapped into ArchiveFormatError below. An
# invalid escape in a protocol-0 string only warns (DeprecationWarning): _replay turns that
# warning into an error too, so hostile bytes never leak a warning (or, under -W error, a
# bare exception) out of the scan.
_DECODE_ERRORS = (ValueError, EOFError, struct.error, OverflowError, TypeError, DeprecationWarning)


class _Opaque:
    """A stack value the scan does not track (anything that is not a string constant)."""

    __slots__ = ()


_OPAQUE = _Opaque()


@dataclass(frozen=True)
class _GlobalRef:
    """The object an import opcode pushes (identity matters: one instance per opcode)."""

    module: str | None  # None when unresolved
    name: str | None

    @property
    def dotted(self) -> str:
        if self.module is None or self.name is None:
            return UNRESOLVED
        return f"{self.module}.{self.name}"


@dataclass
class _Walk:
    """The result of replaying a pickle's opcodes: imports in order, opcode names, last value."""

    refs: list[_GlobalRef] = field(default_factory=list)
    op_names: set[str] = field(default_factory=set)
    ops: int = 0
    result: object = None  # the value popped by STOP
    leftover: int = 0  # values (and marks) still on the stacks after STOP


def pickle_globals(
    data: bytes | bytearray | memoryview, *, max_ops: int = DEFAULT_MAX_OPS
) -> list[str]:
    """List every global a pickle would import, statically, in order of first appearance.

    Args:
        data: the pickle's bytes (uncompressed). Only the first pickle is read (up to ``STOP``),
            as ``pickle.loads`` does.
        max_ops: refuse pickles with more opcodes than this.

    Returns:
        ``"module.qualname"`` strings, deduplicated, in the order the unpickler would import
        them. With protocols 0-2 the names are mapped the way the unpickler maps Python 2
        names (``__builtin__.eval`` is listed as ``builtins.eval``). An import that cannot be
        resolved statically is listed as :data:`UNRESOLVED` (``"<unresolved>"``).

    Raises:
        ArchiveFormatError: the bytes are not a well-formed pickle (truncated, unknown opcode,
            stack underflow, memo read before write...); the message gives the byte offset.
        LimitExceededError: more than ``max_ops`` opcodes.

    Example:
        >>> import json, pickle
        >>> pickle_globals(pickle.dumps([json.dumps, json.loads]))
        ['json.dumps', 'json.loads']
    """
    walk = _replay(data, max_ops=max_ops)
    seen: dict[str, None] = {}
    for ref in walk.refs:
        seen.setdefault(ref.dotted, None)
    return list(seen)


def is_plain_global_reference(data: bytes | bytearray | memoryview) -> str | None:
    """Return ``"module:qualname"`` if the pickle is nothing but one global reference.

    That is what ``pickle.dumps(some_function)`` (any protocol), ``cloudpickle.dumps`` of an
    importable function, and joblib produce for a function stored by reference: string
    constants, memo operations, one ``GLOBAL`` or ``STACK_GLOBAL``, and ``STOP`` returning
    exactly the imported object. Anything else (a ``REDUCE``, a second import, containers,
    names that are not dotted ASCII identifiers) gives ``None``.

    Args:
        data: the pickle's bytes.

    Returns:
        ``"module:qualname"`` (names mapped as the unpickler maps them for protocols 0-2), or
        ``None``.

    Raises:
        ArchiveFormatError: the bytes are not a well-formed pickle.

    Example:
        >>> import json, pickle
        >>> is_plain_global_reference(pickle.dumps(json.dumps))
        'json:dumps'
    """
    try:
        walk = _replay(data, max_ops=_PLAIN_REFERENCE_MAX_OPS)
    except LimitExceededError:
        return None
    if not walk.op_names <= _PLAIN_REFERENCE_OPS or len(walk.refs) != 1 or walk.leftover:
        return None
    ref = walk.refs[0]
    if walk.result is not ref or ref.module is None or ref.name is None:
        return None
    if not (_is_dotted_identifier(ref.module) and _is_dotted_identifier(ref.name)):
        return None
    return f"{ref.module}:{ref.name}"


def _is_dotted_identifier(text: str) -> bool:
    return all(part.isascii() and part.isidentifier() for part in text.split("."))


def _ops(
    data: bytes | bytearray | memoryview,
) -> Iterator[tuple[pickletools.OpcodeInfo, object, int]]:
    """Decode opcodes, turning every pickletools failure into ArchiveFormatError."""
    stream = io.BytesIO(bytes(data))
    iterator = pickletools.genops(stream)
    while True:
        position = stream.tell()
        try:
            with warnings.catch_warnings():
                # decoding a hostile string opcode may warn (an invalid escape in a
                # raw-unicode-escape text): the bytes are data here, and a warning turned into
                # an error by the caller's filters must not escape as something else
                warnings.simplefilter("ignore", DeprecationWarning)
                item = next(iterator)
        except StopIteration:
            return
        except _DECODE_ERRORS as exc:
            raise ArchiveFormatError(
                f"malformed pickle: cannot decode the opcode at byte {position}: {exc}"
            ) from None
        opcode, arg, pos = item
        yield opcode, arg, pos if pos is not None else position


def _replay(data: bytes | bytearray | memoryview, *, max_ops: int) -> _Walk:
    """Replay the unpickler's stacks and memo (as ``pickle.py`` does), executing nothing."""
    if len(data) == 0:
        raise ArchiveFormatError("malformed pickle: empty input (no STOP opcode)")
    machine = _Machine()
    walk = machine.walk
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for opcode, arg, pos in _ops(data):
            walk.ops += 1
            if walk.ops > max_ops:
                raise LimitExceededError(
                    f"pickle has more than {max_ops} opcodes (max_ops); refusing to scan further"
                )
            walk.op_names.add(opcode.name)
            machine.step(opcode, arg, pos)
            if machine.stopped:
                break
    if not machine.stopped:  # genops raises on truncation before STOP; keep this explicit
        raise ArchiveFormatError("malformed pickle: no STOP opcode")
    walk.leftover = len(machine.stack) + len(machine.metastack)
    return walk


class _Machine:
    """The unpickler's state as ``pickle.py`` keeps it, with strings tracked and all else opaque."""

    def __init__(self) -> None:
        self.walk = _Walk()
        self.stack: list[object] = []
        self.metastack: list[list[object]] = []  # MARK saves the current stack here
        self.memo: dict[int, object] = {}
        self.proto = 0
        self.stopped = False
        self._pos = 0
        self._name = ""

    # -- helpers -------------------------------------------------------------------------

    def _fail(self, what: str) -> ArchiveFormatError:
        return ArchiveFormatError(f"malformed pickle: {self._name} at byte {self._pos}: {what}")

    def _top(self) -> object:
        if not self.stack:
            raise self._fail("stack underflow")
        return self.stack[-1]

    def _pop(self) -> object:
        if not self.stack:
            raise self._fail("stack underflow")
        return self.stack.pop()

    def _pop_mark(self) -> list[object]:
        if not self.metastack:
            raise self._fail("no MARK to pop to")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def _import(self, module: object, name: object) -> _GlobalRef:
        if not (isinstance(module, str) and isinstance(name, str)):
            ref = _GlobalRef(None, None)
        else:
            if self.proto < 3:  # the unpickler's fix_imports mapping of Python 2 names
                key = (module, name)
                if key in _compat_pickle.NAME_MAPPING:
                    module, name = _compat_pickle.NAME_MAPPING[key]
                elif module in _compat_pickle.IMPORT_MAPPING:
                    module = _compat_pickle.IMPORT_MAPPING[module]
            ref = _GlobalRef(module, name)
        self.walk.refs.append(ref)
        return ref

    def _memo_index(self, arg: object) -> int:
        if not isinstance(arg, int) or arg < 0:
            raise self._fail(f"bad memo index {arg!r}")
        return arg

    # -- one opcode ----------------------------------------------------------------------

    def step(self, opcode: pickletools.OpcodeInfo, arg: object, pos: int) -> None:
        """Apply one opcode's effect on the stacks and memo."""
        self._pos, self._name = pos, name = pos, opcode.name
        if name in _STRING_OPS:
            self.stack.append(arg if isinstance(arg, str) else _OPAQUE)
        elif name == "MEMOIZE":
            self.memo[len(self.memo)] = self._top()
        elif name in _PUT_OPS:
            index = self._memo_index(arg)
            self.memo[index] = self._top()
        elif name in _GET_OPS:
            index = self._memo_index(arg)
            if index not in self.memo:
                raise self._fail(f"memo index {index} read before it was written")
            self.stack.append(self.memo[index])
        elif name == "MARK":
            self.metastack.append(self.stack)
            self.stack = []
        elif name == "POP":  # pops the mark itself when nothing is above it (as pickle does)
            if self.stack:
                self.stack.pop()
            else:
                self._pop_mark()
        elif name == "DUP":
            self.stack.append(self._top())
        elif name == "PROTO":
            self.proto = arg if isinstance(arg, int) else 0
        elif name in ("GLOBAL", "INST"):
            module, _, qualname = str(arg).partition(" ")
            if name == "INST":
                self._pop_mark()
            self.stack.append(self._import(module, qualname))
        elif name == "STACK_GLOBAL":
            qualname_value = self._pop()
            module_value = self._pop()
            self.stack.append(self._import(module_value, qualname_value))
        elif name in _EXT_OPS:  # resolved at load time through copyreg's registry
            self.stack.append(self._import(None, None))
        elif name == "STOP":
            self.walk.result = self._pop()
            self.stopped = True
        else:
            self._generic(opcode)

    def _generic(self, opcode: pickletools.OpcodeInfo) -> None:
        """Apply an untracked opcode's documented stack effect; its results are opaque."""
        before = opcode.stack_before
        if pickletools.markobject in before:
            mark_at = before.index(pickletools.markobject)
            sliced = self._pop_mark()
            # e.g. OBJ is [mark, cls, stackslice]: the class is the first item above the mark
            needed = sum(1 for item in before[mark_at + 1 :] if item is not pickletools.stackslice)
            if len(sliced) < needed:
                raise self._fail("stack underflow")
            for _ in before[:mark_at]:
                self._pop()
        else:
            for _ in before:
                self._pop()
        self.stack.extend(_OPAQUE for _ in opcode.stack_after)
