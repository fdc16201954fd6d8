"""Limits: every size and count a reader accepts from an untrusted archive, with defaults."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_LIMITS", "Limits"]

_MiB = 1 << 20
_GiB = 1 << 30


@dataclass(frozen=True)
class Limits:
    """Upper bounds applied before anything is allocated. Raise them for huge models.

    The defaults are sized to real archives with a wide margin (a federated Haiku model has
    tens to thousands of tensors; 100,000 tensors take a ~15 MB manifest and a ~10 MB
    safetensors header) so that a hostile archive at every default costs at most seconds and
    a few hundred MB to refuse (``tools/bench.py --hostile`` measures it; SECURITY.md has the
    figures).

    Attributes:
        max_manifest_bytes: size of ``manifest.json``.
        max_signature_bytes: size of ``signature.json``.
        max_header_bytes: the safetensors JSON header (safetensors itself caps at 100 MB).
        max_tensors: number of tensors in the manifest and in the weights member.
        max_json_values: values in one JSON document (manifest, safetensors header,
            signature, config), bounded before parsing by counting its ``,``, ``[`` and
            ``{`` bytes; this bounds the parser's memory (roughly 50 to 200 bytes a value).
        max_member_bytes: any one member, stored or decompressed.
        max_total_bytes: the whole archive.
        max_functions_bytes: the function blob after decompression.
        max_pickle_ops: opcodes walked when a function blob is checked (hkstore walks every
            pickle's opcodes, statically, on every load: about 1.2 s per million opcodes
            here; a cloudpickle of a model and loss is a few thousand).
        max_zstd_window_bytes: zstd decoder window.
    """

    max_manifest_bytes: int = 32 * _MiB
    max_signature_bytes: int = 64 * 1024
    max_header_bytes: int = 32 * _MiB
    max_tensors: int = 100_000
    max_json_values: int = 2_000_000
    max_member_bytes: int = 256 * _GiB
    max_total_bytes: int = 256 * _GiB
    max_functions_bytes: int = 256 * _MiB
    max_pickle_ops: int = 250_000
    max_zstd_window_bytes: int = 128 * _MiB


DEFAULT_LIMITS = Limits()
