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
    "MEMBER_NAMES",
    "SIGNATURE",
    "WEIGHTS",
    "WEIGHTS_ZSTD",
]

WEIGHTS = "weights.safetensors"
WEIGHTS_ZSTD = "weights.safetensors.zst"
FUNCTIONS = "functions.pkl.zst"
MANIFEST = "manifest.json"
SIGNATURE = "signature.json"

#: Every member name a v1 archive may hold.
MEMBER_NAMES: frozenset[str] = frozenset({WEIGHTS, WEIGHTS_ZSTD, FUNCTIONS, MANIFEST, SIGNATURE})
#: Members no digest covers on their own (the manifest is what digests cover; the signature
#: covers the manifest): the container parser checks their CRC-32 when reading them.
CRC_CHECKED: frozenset[str] = frozenset({MANIFEST, SIGNATURE})
