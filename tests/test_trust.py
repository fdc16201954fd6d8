"""Tests for hkstore.store._trust: the Trust policy (weights-only by default, fail closed)."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import pytest

from hkstore.errors import (
    InvalidKeyError,
    RefusedCodeError,
    TrustPolicyError,
    UnsafeTrustWarning,
    UntrustedKeyError,
)
from hkstore.store._keys import generate_ed25519_keypair, load_signer
from hkstore.store._signing import (
    Ed25519Signer,
    HmacKey,
    sign_manifest,
    verify_manifest_signature,
)
from hkstore.store._trust import Trust

NOT_ALLOWED = (
    "refusing to unpickle the pickled functions: the trust policy does not allow pickled code "
    "(allow_pickle=False). Options: pass the functions yourself (model=..., loss=...) and load "
    "the weights only; or Trust(allow_pickle=True, keys=[<the signer's public key>]) for a "
    "pickle signed by a key you trust; or Trust(allow_pickle=True, allow_unsigned=True) to run "
    "an unsigned pickle (unsafe: it can run any code)"
)
OPTIONS = (
    ". Options: Trust(allow_pickle=True, keys=[<the signer's public key>]) if you trust the "
    "signer; or add allow_unsigned=True (unsafe: it can run any code); or pass the functions "
    "yourself (model=..., loss=...) and load the weights only"
)


def _refused(trust: Trust, key_id: str | None) -> str:
    with pytest.raises(RefusedCodeError) as info:
        trust.check_pickle_allowed(key_id)
    return str(info.value)


def _policy_error(**kwargs: Any) -> str:
    with pytest.raises(TrustPolicyError) as info:
        Trust(**kwargs)
    assert isinstance(info.value, ValueError)
    return str(info.value)


# --- the default -------------------------------------------------------------------------------


def test_default_is_weights_only() -> None:
    trust = Trust()
    assert repr(trust) == "Trust(keys=(), modules=()) [weights only]"
    assert trust.keys == () and trust.verifiers == () and trust.modules == ()
    assert not (trust.allow_pickle or trust.allow_unsigned or trust.require_signature)
    assert not trust.allow_python_mismatch and trust.unsafe_options == ()
    assert not trust.allows_module("json")
    assert _refused(trust, None) == NOT_ALLOWED
    assert _refused(trust, "ed25519:" + "0" * 32) == NOT_ALLOWED


def test_trust_is_keyword_only_and_frozen() -> None:
    with pytest.raises(TypeError):
        Trust(())  # type: ignore[call-arg]
    trust = Trust()
    with pytest.raises(dataclasses.FrozenInstanceError):
        trust.allow_pickle = True  # type: ignore[misc]


def test_trust_equality_hash_and_replace() -> None:
    key = HmacKey(bytes(range(32)))
    a = Trust(keys=[key], modules=["mypkg"], allow_pickle=True)
    b = Trust(keys=(HmacKey(bytes(range(32))),), modules=("mypkg",), allow_pickle=True)
    assert a == b and hash(a) == hash(b)
    c = dataclasses.replace(a, allow_unsigned=True)
    assert c.allow_unsigned and c.keys == a.keys
    assert c != a


# --- keys --------------------------------------------------------------------------------------


def test_keys_accept_verifiers_signers_and_key_files(tmp_path: Path) -> None:
    id_a = generate_ed25519_keypair(tmp_path / "a")
    id_b = generate_ed25519_keypair(tmp_path / "b")
    signer = Ed25519Signer.generate()
    hmac_key = HmacKey.generate()
    trust = Trust(
        keys=[
            tmp_path / "a.pub",
            str(tmp_path / "b.key"),  # a private key file: its public half is used
            signer,
            hmac_key,
            signer.verifier(),  # duplicate of `signer`: dropped
            tmp_path / "a.key",  # duplicate of a.pub: dropped
        ]
    )
    assert trust.key_ids == (id_a, id_b, signer.key_id, hmac_key.key_id)
    assert all(callable(key.verify) for key in trust.verifiers)
    assert repr(trust).startswith(f"Trust(keys=({id_a!r}, ")


def test_keys_verify_archive_signatures_end_to_end(tmp_path: Path) -> None:
    generate_ed25519_keypair(tmp_path / "server")
    signer = load_signer(tmp_path / "server.key")
    manifest = b'{"format":"hkstore"}'
    signature = sign_manifest(manifest, signer)
    trust = Trust(keys=[tmp_path / "server.pub"], allow_pickle=True)
    key_id = verify_manifest_signature(signature, manifest, trust.verifiers)
    assert key_id == signer.key_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trust.check_pickle_allowed(key_id)  # allowed, silently (a warning would raise here)
    # the controls: another key's signature is untrusted, and no signature is refused
    other = Ed25519Signer.generate()
    with pytest.raises(UntrustedKeyError, match=f"signed by {other.key_id}"):
        verify_manifest_signature(sign_manifest(manifest, other), manifest, trust.verifiers)
    with pytest.raises(RefusedCodeError, match="not signed by any of the trusted keys"):
        trust.check_pickle_allowed(None)


def test_keys_errors(tmp_path: Path) -> None:
    assert _policy_error(keys="alice.pub") == (
        "Trust(keys=...) takes a list of keys or key file paths, got str "
        "(for one key write keys=[key])"
    )
    assert _policy_error(keys=[HmacKey.generate(), 42]) == (
        "Trust(keys=...)[1]: expected a key (Ed25519Verifier, HmacKey) or a key file path, "
        "got int"
    )

    class Rsa:
        algorithm = "rsa-pss"
        key_id = "rsa:1"

        def verify(self, payload: bytes, signature: bytes) -> bool:
            return False

    assert _policy_error(keys=[Rsa()]) == (
        "Trust(keys=...)[0]: algorithm 'rsa-pss' is not supported ('ed25519' or 'hmac-sha256')"
    )
    secret = tmp_path / "fed.secret"
    secret.write_bytes(bytes(range(32)))
    with pytest.raises(InvalidKeyError) as info:  # HMAC secrets are not accepted as paths
        Trust(keys=[secret])
    assert str(info.value).startswith(f"{secret}: not an Ed25519 key")


# --- modules -----------------------------------------------------------------------------------


def test_allows_module_exact_and_dotted_prefix() -> None:
    trust = Trust(modules=["mypkg", "other.models", "mypkg"])
    assert trust.modules == ("mypkg", "other.models")
    for name in ("mypkg", "mypkg.sub", "mypkg.sub.deep", "other.models", "other.models.mlp"):
        assert trust.allows_module(name), name
    refused: tuple[Any, ...] = (
        "mypkgx",
        "mypkg_x",
        "other",
        "other.modelsx",
        "mypkg._private",
        "mypkg.__init__",
        "mypkg.sub._impl",
        "mypkg.",
        ".mypkg",
        "",
        "mypkg..sub",
        "mypkg sub",
        "mypkg.\u0455ub",  # Cyrillic dze: an identifier, but not ASCII
        5,
    )
    for name in refused:
        assert not trust.allows_module(name), name


def test_modules_validation_lists_every_problem() -> None:
    message = _policy_error(
        modules=["ok", "", "a..b", "1pkg", "pkg._private", "__main__", "os", "os.path", 3]
    )
    bad_name = "is not a dotted module name (ASCII identifiers)"
    private = "has a private ('_') segment; private modules are never allowed"
    refused = (
        "is refused: its functions run commands or code by design, so allowing it would let "
        "an archive run anything"
    )
    assert message == (
        f"Trust(modules=...): '' {bad_name}; 'a..b' {bad_name}; '1pkg' {bad_name}; "
        f"'pkg._private' {private}; '__main__' {private}; 'os' {refused}; 'os.path' {refused}; "
        "3 is not a module name (int)"
    )
    assert _policy_error(modules="mypkg") == (
        "Trust(modules=...) takes a list of module names, got str "
        "(for one module write modules=['mypkg'])"
    )
    for root in ("builtins", "subprocess", "pickle", "importlib.util", "sys"):
        assert "is refused" in _policy_error(modules=[root])


# --- flags -------------------------------------------------------------------------------------


def test_flags_must_be_booleans() -> None:
    assert _policy_error(allow_pickle="no") == (
        "Trust(allow_pickle=...) must be True or False, got 'no'"
    )
    assert "require_signature" in _policy_error(require_signature=1)


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        (
            {"allow_unsigned": True},
            "allow_unsigned=True has no effect without allow_pickle=True (it only widens which "
            "pickles may be unpickled); pass both, or neither",
        ),
        (
            {"allow_python_mismatch": True},
            "allow_python_mismatch=True has no effect without allow_pickle=True or "
            "approved=[...] (it only widens which pickles may be unpickled)",
        ),
        (
            {"require_signature": True},
            "require_signature=True needs keys=[...] to verify signatures with; with no keys "
            "every archive would be refused",
        ),
    ],
)
def test_contradictory_options_are_refused(kwargs: dict[str, Any], problem: str) -> None:
    assert _policy_error(**kwargs) == f"invalid Trust: {problem}"


def test_require_signature_contradicts_allow_unsigned() -> None:
    message = _policy_error(
        keys=[HmacKey.generate()], allow_pickle=True, allow_unsigned=True, require_signature=True
    )
    assert message == "invalid Trust: require_signature=True contradicts allow_unsigned=True"


# --- the pickle gate -----------------------------------------------------------------------------


def test_check_pickle_allowed_needs_a_trusted_signature() -> None:
    key = HmacKey.generate()
    trust = Trust(keys=[key], allow_pickle=True)
    trust.check_pickle_allowed(key.key_id)
    assert _refused(trust, None) == (
        "refusing to unpickle the pickled functions: it is not signed by any of the trusted keys"
        + OPTIONS
    )
    stranger = HmacKey.generate().key_id
    assert _refused(trust, stranger) == (
        f"refusing to unpickle the pickled functions: it is signed by {stranger}, which is not "
        "one of the trusted keys" + OPTIONS
    )
    assert _refused(Trust(allow_pickle=True), None) == (
        "refusing to unpickle the pickled functions: the trust policy lists no keys to verify "
        "a signature with (an unsigned pickle, or a signature nobody checked)" + OPTIONS
    )


def test_allow_unsigned_warns_on_every_use() -> None:
    key = HmacKey.generate()
    trust = Trust(keys=[key], allow_pickle=True, allow_unsigned=True)
    for _ in range(2):
        with pytest.warns(UnsafeTrustWarning) as record:
            trust.check_pickle_allowed(None)
        assert str(record[0].message) == (
            "unpickling functions that are not signed by a trusted key (it is not signed by any "
            "of the trusted keys) because Trust(allow_unsigned=True): they can run any code"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trust.check_pickle_allowed(key.key_id)  # signed by a trusted key: no warning


def test_repr_flags_unsafe_options() -> None:
    key = HmacKey.generate()
    assert repr(Trust(keys=[key], allow_pickle=True)) == (
        f"Trust(keys=({key.key_id!r},), modules=(), allow_pickle=True)"
    )
    assert repr(Trust(modules=["mypkg"], require_signature=True, keys=[key])) == (
        f"Trust(keys=({key.key_id!r},), modules=('mypkg',), require_signature=True)"
    )
    unsafe = Trust(allow_pickle=True, allow_unsigned=True, allow_python_mismatch=True)
    assert unsafe.unsafe_options == ("allow_unsigned", "allow_python_mismatch")
    assert repr(unsafe) == (
        "Trust(keys=(), modules=(), allow_pickle=True, allow_unsigned=True, "
        "allow_python_mismatch=True) [UNSAFE: allow_unsigned runs unsigned pickled code; "
        "allow_python_mismatch unpickles code from another Python]"
    )
