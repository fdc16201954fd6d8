"""hkstore.integrations.declearn: hkstore models in declearn, and declearn's files in hkstore.

Conversion of declearn 2.x ``HaikuModel`` checkpoints into hkstore archives, without unpickling
anything and without declearn itself installed: :func:`convert` (what ``hkstore
convert-declearn`` runs), :func:`read_declearn`, :func:`locate_inputs`.

Example:
    >>> from hkstore.integrations.declearn import convert, locate_inputs
    >>> config, state = locate_inputs(Path("ckpt"), None)  # doctest: +SKIP
    >>> convert(config, state, "converted.hkz").text  # doctest: +SKIP
"""

from hkstore.integrations.declearn._convert import CONFIG_NAME as CONFIG_NAME
from hkstore.integrations.declearn._convert import ConvertSummary as ConvertSummary
from hkstore.integrations.declearn._convert import DeclearnModel as DeclearnModel
from hkstore.integrations.declearn._convert import convert as convert
from hkstore.integrations.declearn._convert import decode_array as decode_array
from hkstore.integrations.declearn._convert import function_reference as function_reference
from hkstore.integrations.declearn._convert import locate_inputs as locate_inputs
from hkstore.integrations.declearn._convert import read_declearn as read_declearn

__all__ = [
    "CONFIG_NAME",
    "ConvertSummary",
    "DeclearnModel",
    "convert",
    "decode_array",
    "function_reference",
    "locate_inputs",
    "read_declearn",
]
