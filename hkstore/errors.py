"""The hkstore error family: one base class, named subclasses, each also a fitting builtin.

Every failure hkstore raises on purpose is an :class:`HkstoreError`. Subclasses also derive
from the builtin a declearn-style caller would catch (``ValueError``, ``KeyError``,
``TypeError``, ``PermissionError``), so ``except ValueError`` keeps working.

Example:
    >>> import hkstore
    >>> try:
    ...     raise hkstore.errors.DigestMismatchError("tensor 'a:w': digest mismatch")
    ... except ValueError as exc:
    ...     print(type(exc).__name__)
    DigestMismatchError
"""

from __future__ import annotations

__all__ = [
    "ArchiveFormatError",
    "ArrayRecordCastWarning",
    "ArrayRecordMismatchError",
    "CheckpointExistsError",
    "CheckpointFormatError",
    "CheckpointLockedError",
    "CheckpointNotFoundError",
    "CheckpointWarning",
    "CheckpointWriteError",
    "ClippingError",
    "ConfigError",
    "ContainerError",
    "DataInfoError",
    "DeclearnFormatError",
    "DigestMismatchError",
    "FrameworkVersionError",
    "HkstoreError",
    "IntegrityError",
    "InvalidKeyError",
    "InvalidSeedError",
    "LimitExceededError",
    "ManifestError",
    "MissingDependencyError",
    "ModelFunctionError",
    "NotImportableError",
    "NotInitializedError",
    "RefusedCodeError",
    "RefusedPayloadError",
    "RngStateError",
    "RuntimeMismatchError",
    "SignatureError",
    "StateMismatchError",
    "StrategyStateError",
    "TrustPolicyError",
    "UnsafeTrustWarning",
    "UnsupportedContainerVersionError",
    "UnsupportedDtypeError",
    "UnsupportedVersionError",
    "UntrustedKeyError",
    "WeightsFormatError",
    "WeightsMismatchError",
]


class HkstoreError(Exception):
    """Base class of every error hkstore raises on purpose."""


# --- reading archives -------------------------------------------------------------------


class ArchiveFormatError(HkstoreError, ValueError):
    """The archive is malformed: not something a v1 writer could have produced."""


class ContainerError(ArchiveFormatError):
    """The ZIP container is malformed, truncated, or has members it must not have."""


class ManifestError(ArchiveFormatError):
    """``manifest.json`` is not valid canonical JSON or does not match the v1 schema."""


class ConfigError(ArchiveFormatError):
    """A model config (``HaikuModel.get_config()``'s document) is malformed (schema v1)."""


class WeightsFormatError(ArchiveFormatError):
    """The safetensors member is malformed or disagrees with the manifest."""


class UnsupportedVersionError(ArchiveFormatError):
    """The archive declares a format version this reader does not implement."""


class UnsupportedContainerVersionError(ContainerError, UnsupportedVersionError):
    """The container's end-record magic names a later container version (``hkstore/2``...)."""


class DeclearnFormatError(HkstoreError, ValueError):
    """A declearn config or checkpoint this reader does not understand, or a bad option for it.

    ``hkstore convert-declearn`` exits 2 for it: the input cannot be judged as an archive.
    """


class LimitExceededError(ArchiveFormatError):
    """A size, count or length in the input is larger than the configured limit allows."""


class CheckpointFormatError(ArchiveFormatError):
    """A checkpoint round is malformed or incomplete: its record, layout or state structure."""


# --- integrity and trust ----------------------------------------------------------------


class IntegrityError(HkstoreError, ValueError):
    """The archive's bytes do not match what its manifest or signature promises."""


class DigestMismatchError(IntegrityError):
    """A member's or tensor's SHA-256 digest (or size) differs from the manifest."""


class SignatureError(IntegrityError):
    """A signature is missing where required, malformed, or does not verify."""


class UntrustedKeyError(SignatureError):
    """The archive is signed, but by a key the caller did not list as trusted."""


class RefusedCodeError(HkstoreError, PermissionError):
    """The trust policy refuses to import or unpickle code named by the archive."""


class RuntimeMismatchError(RefusedCodeError):
    """A pickle was written by another Python version or implementation; refused unread."""


class InvalidKeyError(HkstoreError, ValueError):
    """A key, key file or shared secret is malformed, of the wrong kind, or too short."""


class TrustPolicyError(HkstoreError, ValueError):
    """A ``Trust`` policy is contradictory or names something it cannot allow."""


class UnsafeTrustWarning(UserWarning):
    """Emitted each time a policy lets unsigned pickled code run (``allow_unsigned=True``)."""


class MissingDependencyError(HkstoreError, ImportError):
    """An optional dependency is not installed (the message names the extra to install)."""


class FrameworkVersionError(HkstoreError, ImportError):
    """A framework's internals that an hkstore integration relies on are not where they were.

    The message names the framework's version and what moved; the integration refuses to run
    unguarded rather than guess.
    """


# --- framework messages -----------------------------------------------------------------


class RefusedPayloadError(HkstoreError, TypeError, ValueError):
    """A framework message payload hkstore refused to decode (the cause, if any, is chained).

    A model type outside the allow-list, a type only lazily registered, or a model whose
    archive or config the receive policy refuses or that is malformed. Also a ``TypeError``
    and a ``ValueError``: what declearn's message decoding treats as a bad message.
    """


# --- models and values ------------------------------------------------------------------


class UnsupportedDtypeError(HkstoreError, TypeError):
    """A dtype that the format cannot store exactly (never silently cast)."""


class WeightsMismatchError(HkstoreError, KeyError, ValueError):
    """Weights do not fit the model: every missing, unexpected, reshaped or retyped name."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable.
        return str(self.args[0]) if self.args else ""


class ArrayRecordMismatchError(WeightsMismatchError):
    """A Flower ``ArrayRecord`` that does not fit the model (``from_arrayrecord``).

    Every tensor at fault is named: missing or unexpected keys, shapes, dtypes, and ``Array``
    values whose bytes do not hold what their ``dtype``/``shape`` fields say.
    """


class ArrayRecordCastWarning(UserWarning):
    """``from_arrayrecord`` cast float64 arrays back to a float32 model's dtype (names them).

    Flower's FedOpt strategies (FedAdam, FedYogi, FedAdagrad) return float64 arrays for a
    float32 model under NumPy 2; the cast is the one dtype change ``from_arrayrecord`` makes.
    """


class DataInfoError(HkstoreError, ValueError):
    """``data_info`` is missing a field, has a bad value, or conflicts with an earlier one."""


class RngStateError(HkstoreError, ValueError):
    """A random state that is not one PRNG key of a known implementation."""


class ClippingError(HkstoreError, ValueError):
    """An unknown clipping switch, or a model whose layer calls change between traces."""


class InvalidSeedError(HkstoreError, ValueError, TypeError):
    """A model seed that is not an int in ``[0, 2**32)`` (jax keys hold 32 bits)."""


class NotInitializedError(HkstoreError, ValueError):
    """The model must be initialized (``initialize(data_info)``) before this call."""


class ModelFunctionError(HkstoreError, RuntimeError):
    """The caller's model function raised while hkstore traced it (the cause is chained)."""


class NotImportableError(HkstoreError, ValueError):
    """A function cannot be stored by reference (lambda, closure, ``__main__``...)."""


class StateMismatchError(HkstoreError, ValueError):
    """A checkpoint state that cannot be stored, or a ``state_like`` template that does not fit.

    The message names every path at fault (``$[0].mu['lin:w']``) and what was expected.
    """


class StrategyStateError(HkstoreError, ValueError):
    """A federated strategy's state that hkstore cannot save or put back.

    A strategy class with no entry in the state table (and no ``state_attributes``), an
    attribute holding something the checkpoint format cannot store, or a checkpoint written for
    another strategy class or with other attributes: the message names the class, attribute or
    round at fault and what was expected.
    """


# --- checkpoint directories -------------------------------------------------------------


class CheckpointExistsError(HkstoreError, FileExistsError):
    """The round is already saved; pass ``overwrite=True`` to replace it."""


class CheckpointNotFoundError(HkstoreError, FileNotFoundError):
    """No such round in the checkpoint directory (or no complete round at all)."""


class CheckpointLockedError(HkstoreError, RuntimeError):
    """Another Checkpointer (this process or another) is saving into the same directory."""


class CheckpointWarning(UserWarning):
    """``Checkpointer.restore()`` skipped a round that does not verify (the message says why)."""


class CheckpointWriteError(HkstoreError, OSError):
    """Writing a round failed (disk full, file too large, read-only folder...): names the file.

    Earlier rounds are untouched and nothing partial becomes visible.
    """
