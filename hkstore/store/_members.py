"""The names of an archive's members: the one table the container, manifest and readers share.

A v1 archive holds only these members (anything else is refused by the container parser):

====================================  ==========================================================
``weights.safetensors``               the weights, a standard safetensors file (uncompressed)
``weights.safetensors.zst``           the same file as one zstd frame (``compression="zstd"``)
``functions.pkl.zst``                 the opt-in pickled functions (zstd cloudpickle)
``manifest.json``                     the canonical JSON manifest (always present)
``signature.json``                    the signature over the manifest (only when signed)
====================================  ==========================================================

Example:
    >>> MANIFEST in MEMBER_NAMES and SIGNATURE in MEMBER_NAMES
    True
"""

from __future__ import annotations

__all__ = [
    "CRC_CHECKED",
    "FUNCTIONS",
    "MANIFEST",
    "MEMBER_LAYOUT",
    "MEMBER_NAMES",
    "MEMBER_ORDER",
    "SIGNATURE",
    "WEIGHTS",
    "WEIGHTS_ZSTD",
]

WEIGHTS = "weights.safetensors"
WEIGHTS_ZSTD = "weights.safetensors.zst"
FUNCTIONS = "functions.pkl.zst"
MANIFEST = "manifest.json"
SIGNATURE = "signature.json"

#: Every member name a v1 archive may hold, in the only order they may appear in the file.
MEMBER_ORDER: tuple[str, ...] = (WEIGHTS, WEIGHTS_ZSTD, FUNCTIONS, MANIFEST, SIGNATURE)
MEMBER_NAMES: frozenset[str] = frozenset(MEMBER_ORDER)
#: Member name -> (data alignment, streamed). A streamed member's local header reserves 20
#: bytes for a ZIP64 field before its size is known; they become padding when it is small.
#: With the order above this fixes every byte of the container (see ``_container``).
MEMBER_LAYOUT: dict[str, tuple[int, bool]] = {
    WEIGHTS: (64, True),
    WEIGHTS_ZSTD: (1, True),
    FUNCTIONS: (1, False),
    MANIFEST: (1, False),
    SIGNATURE: (1, False),
}
#: Members no digest covers on their own (the manifest is what digests cover; the signature
#: covers the manifest): the container parser checks their CRC-32 when reading them.
CRC_CHECKED: frozenset[str] = frozenset({MANIFEST, SIGNATURE})
