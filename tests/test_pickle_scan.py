"""Tests for hkstore.store._pickle_scan: static, memo-aware listing of a pickle's imports."""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import sys
from pathlib import Path

import cloudpickle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hkstore.errors import ArchiveFormatError, HkstoreError, LimitExceededError
from hkstore.store._pickle_scan import UNRESOLVED, is_plain_global_reference, pickle_globals

PROTOCOLS = range(pickle.HIGHEST_PROTOCOL + 1)


def _system_reducer(command: str) -> object:
    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (command,))

    return Exploit()


def _naive_stack_global(data: bytes) -> list[str]:
    """What a scan that ignores the memo reports: the last two string constants."""
    strings: list[str] = []
    found = []
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(str(arg))
        elif opcode.name == "STACK_GLOBAL":
            found.append(f"{strings[-2]}.{strings[-1]}")
    return found


def _s(text: str) -> bytes:
    """SHORT_BINUNICODE opcode."""
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


# --- malicious pickles are listed, never run ------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_pickle_globals_lists_system_call_and_runs_nothing(tmp_path: Path, protocol: int) -> None:
    canary = tmp_path / "CANARY"
    blob = pickle.dumps(_system_reducer(f"touch {canary}"), protocol=protocol)
    found = pickle_globals(blob)
    assert found == [f"{os.system.__module__}.system"]
    assert found[0] in ("posix.system", "nt.system", "os.system")
    assert is_plain_global_reference(blob) is None
    assert not canary.exists()


def test_pickle_globals_never_imports_referenced_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = tmp_path / "IMPORTED"
    (tmp_path / "hk_scan_canary_mod.py").write_text(
        f"open({str(canary)!r}, 'w').close()\ndef f():\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for blob in (
        b"\x80\x04" + _s("hk_scan_canary_mod") + _s("f") + b"\x93.",
        b"chk_scan_canary_mod\nf\n.",
    ):
        assert pickle_globals(blob) == ["hk_scan_canary_mod.f"]
        assert is_plain_global_reference(blob) == "hk_scan_canary_mod:f"
    assert "hk_scan_canary_mod" not in sys.modules
    assert not canary.exists()


def test_pickle_globals_lists_inst_opcode(tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    blob = b"(S'touch " + str(canary).encode() + b"'\nios\nsystem\n."
    assert pickle_globals(blob) == ["os.system"]
    assert not canary.exists()


# --- the memo -------------------------------------------------------------------------------


def test_pickle_globals_resolves_memoized_module_name() -> None:
    blob = pickle.dumps([json.dumps, json.loads], protocol=4)
    ops = [op.name for op, _, _ in pickletools.genops(blob)]
    assert "BINGET" in ops  # the second reference re-uses the memoized 'json'
    assert pickle_globals(blob) == ["json.dumps", "json.loads"]


@pytest.mark.parametrize(
    ("put", "get"),
    [
        (b"\x94", lambda i: b"h" + bytes([i])),  # MEMOIZE / BINGET
        (None, lambda i: b"j" + i.to_bytes(4, "little")),  # BINPUT / LONG_BINGET
        (None, lambda i: b"g%d\n" % i),  # BINPUT / GET (protocol 0 text form)
    ],
)
def test_pickle_globals_is_not_fooled_by_decoy_strings(put: bytes | None, get: object) -> None:
    """Memoize 'os'/'system', push and drop decoys, then STACK_GLOBAL from the memo."""
    assert callable(get)

    def memo(index: int) -> bytes:
        return put if put is not None else b"q" + bytes([index])

    blob = (
        b"\x80\x04"
        + _s("os") + memo(0)
        + _s("system") + memo(1)
        + b"00"  # POP POP
        + _s("json") + _s("loads") + b"00"  # decoys a naive scan takes for the operands
        + get(0) + get(1)
        + b"\x93."  # STACK_GLOBAL STOP
    )  # fmt: skip
    assert pickle.loads(blob) is os.system  # the real unpickler's reading (nothing is called)
    assert _naive_stack_global(blob) == ["json.loads"]  # what a memo-blind scan reports
    assert pickle_globals(blob) == ["os.system"]
    assert is_plain_global_reference(blob) is None  # POP is not part of a plain reference


def test_pickle_globals_follows_dup_and_marks() -> None:
    # MARK 'a' 'b' POP_MARK 'json' DUP POP 'dumps' STACK_GLOBAL STOP
    blob = b"\x80\x04(" + _s("a") + _s("b") + b"1" + _s("json") + b"20" + _s("dumps") + b"\x93."
    assert pickle.loads(blob) is json.dumps
    assert pickle_globals(blob) == ["json.dumps"]


def test_pickle_globals_reports_unresolvable_imports() -> None:
    computed = b"\x80\x04cbuiltins\nstr\n(K\x01tR" + _s("x") + b"\x93."  # str(1) as module
    assert pickle_globals(computed) == ["builtins.str", UNRESOLVED]
    assert pickle_globals(b"\x80\x02\x82\x01.") == [UNRESOLVED]  # EXT1: copyreg registry
    assert pickle_globals(b"\x80\x04K\x01" + _s("x") + b"\x93.") == [UNRESOLVED]


def test_pickle_globals_maps_python2_names_like_the_unpickler() -> None:
    blob = b"\x80\x02c__builtin__\neval\n."
    assert pickle_globals(blob) == ["builtins.eval"]
    assert pickle.loads(blob) is eval
    assert pickle_globals(b"\x80\x03c__builtin__\neval\n.") == ["__builtin__.eval"]


def test_pickle_globals_deduplicates_in_order() -> None:
    blob = pickle.dumps([json.loads, json.dumps, json.loads, os.path.join], protocol=2)
    assert pickle_globals(blob) == ["json.loads", "json.dumps", f"{os.path.__name__}.join"]


def test_pickle_globals_cloudpickle_lambda_shows_only_internals() -> None:
    blob = cloudpickle.dumps(lambda x: x + 1)
    found = pickle_globals(blob)
    assert found
    assert all(name.startswith("cloudpickle.") for name in found), found
    assert "cloudpickle.cloudpickle._make_function" in found


# --- plain references (declearn / joblib function pickles) ------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_is_plain_global_reference_on_function_pickles(protocol: int) -> None:
    assert is_plain_global_reference(pickle.dumps(json.dumps, protocol=protocol)) == "json:dumps"


def test_is_plain_global_reference_on_cloudpickle_and_qualnames() -> None:
    assert is_plain_global_reference(cloudpickle.dumps(json.loads)) == "json:loads"
    method = pickle.dumps(json.JSONDecoder.decode, protocol=4)
    assert is_plain_global_reference(method) == "json.decoder:JSONDecoder.decode"
    assert is_plain_global_reference(pickle.dumps(json.JSONDecoder.decode, protocol=2)) is None


@pytest.mark.parametrize(
    "blob",
    [
        pickle.dumps([json.dumps]),
        pickle.dumps((json.dumps, json.loads)),
        pickle.dumps(1),
        pickle.dumps({"f": json.dumps}),
        b"\x80\x04" + _s("json") + _s("dumps") + b"\x93" + _s("x") + b"0.",  # junk after
        b"\x80\x04" + _s("json") + _s("dumps") + b"\x93" + _s("json") + b"\x93.",  # 2 imports
        b"\x80\x04" + _s("js on") + _s("dumps") + b"\x93.",  # not an identifier
        b"\x80\x04" + _s("j\u0455on") + _s("dumps") + b"\x93.",  # not ASCII
    ],
)
def test_is_plain_global_reference_refuses_anything_else(blob: bytes) -> None:
    assert is_plain_global_reference(blob) is None


def test_is_plain_global_reference_refuses_reduce(tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    assert is_plain_global_reference(pickle.dumps(_system_reducer(f"touch {canary}"))) is None
    assert not canary.exists()


# --- malformed input ----------------------------------------------------------------------

_EXHAUSTED = "pickle exhausted before seeing STOP"


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"", "malformed pickle: empty input (no STOP opcode)"),
        (b"\x93.", "malformed pickle: STACK_GLOBAL at byte 0: stack underflow"),
        (b"h\x05.", "malformed pickle: BINGET at byte 0: memo index 5 read before it was written"),
        (b"1.", "malformed pickle: POP_MARK at byte 0: no MARK to pop to"),
        (b"\x94.", "malformed pickle: MEMOIZE at byte 0: stack underflow"),
        (b"(.", "malformed pickle: STOP at byte 1: stack underflow"),
        (b"K\x01a.", "malformed pickle: APPEND at byte 2: stack underflow"),
        (b"(o.", "malformed pickle: OBJ at byte 1: stack underflow"),
        (b"N", f"malformed pickle: cannot decode the opcode at byte 1: {_EXHAUSTED}"),
        (
            pickle.dumps(json.dumps, protocol=4)[:-3],
            f"malformed pickle: cannot decode the opcode at byte 26: {_EXHAUSTED}",
        ),
    ],
)
def test_pickle_globals_malformed_exact_messages(blob: bytes, message: str) -> None:
    with pytest.raises(ArchiveFormatError) as info:
        pickle_globals(blob)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("blob", "prefix"),
    [
        (b"\xff.", "malformed pickle: cannot decode the opcode at byte 0: "),
        (b"\x8c\x09json.", "malformed pickle: cannot decode the opcode at byte 0: "),
        (b"\x8c\x02\xff\xfe.", "malformed pickle: cannot decode the opcode at byte 0: "),
    ],
)  # fmt: skip
def test_pickle_globals_undecodable_bytes(blob: bytes, prefix: str) -> None:
    with pytest.raises(ArchiveFormatError) as info:
        pickle_globals(blob)
    assert str(info.value).startswith(prefix)
    assert info.value.__cause__ is None


def test_pickle_globals_max_ops() -> None:
    blob = pickle.dumps(list(range(500)), protocol=0)
    with pytest.raises(LimitExceededError) as info:
        pickle_globals(blob, max_ops=100)
    assert str(info.value) == (
        "pickle has more than 100 opcodes (max_ops); refusing to scan further"
    )
    assert pickle_globals(blob) == []


# --- fuzz ---------------------------------------------------------------------------------


def _scan_all(data: bytes) -> None:
    for scan in (pickle_globals, is_plain_global_reference):
        try:
            scan(data)
        except (ArchiveFormatError, LimitExceededError):
            pass


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes_raise_only_our_errors(data: bytes) -> None:
    _scan_all(data)


_SEEDS = [
    pickle.dumps([json.dumps, {"a": (1, 2.5, "x", b"y")}, json.loads], protocol=p)
    for p in PROTOCOLS
] + [cloudpickle.dumps(lambda x: x * 2)]


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(_SEEDS),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    st.integers(0, 10_000),
)
def test_fuzz_mutated_pickles_raise_only_our_errors(
    seed: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(seed)
    for position, value in flips:
        data[position % len(data)] = value
    try:
        _scan_all(bytes(data[: max(1, len(data) - cut % 8)]))
    except HkstoreError as exc:  # pragma: no cover - would be a wrong error class
        pytest.fail(f"unexpected {type(exc).__name__}: {exc}")
