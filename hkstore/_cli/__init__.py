"""The ``hkstore`` command's building blocks; :mod:`hkstore.cli` wires them into verbs.

Map: ``_status`` (exit codes and the one exception-to-exit-code mapping), ``_common``
(opening input archives, key options, output), ``_inspect`` (header-only report),
``_verify`` (every check, with progress), ``_diff`` (tensor-by-tensor comparison),
``_declearn`` (reading declearn 2.x configs and checkpoints without unpickling).

Nothing here imports jax or haiku; heavy modules (numpy, jsonschema, cryptography, msgpack)
are imported by the verb that needs them, so that ``hkstore inspect`` starts fast.
"""
