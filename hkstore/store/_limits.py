"""Limits: every size and count a reader accepts from an untrusted archive, with defaults."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_LIMITS", "Limits"]

_MiB = 1 << 20
_GiB = 1 << 30


@dataclass(frozen=True)
class Limits:
    """Upper bounds applied before anything is allocated. Raise them for huge models.

    Attributes:
        max_manifest_bytes: size of ``manifest.json``.
        max_signature_bytes: size of ``signature.json``.
        max_header_bytes: the safetensors JSON header (safetensors itself caps at 100 MB).
        max_tensors: number of tensors in the weights member.
        max_member_bytes: any one member, stored or decompressed.
        max_total_bytes: the whole archive.
        max_functions_bytes: the function blob after decompression.
        max_zstd_window_bytes: zstd decoder window.
    """

    max_manifest_bytes: int = 64 * _MiB
    max_signature_bytes: int = 64 * 1024
    max_header_bytes: int = 100 * _MiB
    max_tensors: int = 1_000_000
    max_member_bytes: int = 256 * _GiB
    max_total_bytes: int = 256 * _GiB
    max_functions_bytes: int = 256 * _MiB
    max_zstd_window_bytes: int = 128 * _MiB


DEFAULT_LIMITS = Limits()
