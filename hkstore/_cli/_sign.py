"""``hkstore sign``: verify an archive, then write it again with a new signature, atomically."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from hkstore._cli._common import open_input
from hkstore._cli._verify import VerifyOutcome, run_checks

if TYPE_CHECKING:
    from hkstore.store import Archive, Signer

__all__ = ["sign_archive"]


def sign_archive(
    source: str,
    dest: str,
    signer: Signer,
    *,
    workers: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> VerifyOutcome:
    """Check every digest of ``source``; if all pass, write it to ``dest`` signed by ``signer``.

    The members are copied byte for byte, the manifest unchanged, and ``signature.json``
    replaced. ``dest`` (which may be ``source``) is written through a temp file in its folder
    and renamed over, so a crash or a failed check leaves the old file untouched. The new file
    keeps ``source``'s permission bits. The existing signature, if any, is not checked: it is
    replaced.

    Returns:
        The verification outcome; nothing was written when ``outcome.failed`` is set.

    Raises:
        UsageError: ``source`` is not an archive at all.
        OSError: ``dest`` cannot be written.
    """
    from hkstore.store import Trust, atomic_write, destination, is_url, local_path

    if is_url(dest) and local_path(dest) is not None:
        dest = local_path(dest) or dest
    mode = stat.S_IMODE(os.stat(source).st_mode) if os.path.exists(source) else 0o644

    def write(archive: Archive) -> None:
        try:
            writing = (destination(dest, storage_options) if is_url(dest)
                       else atomic_write(dest, mode=mode))
            with writing as handle:
                archive.copy_with_signature(handle, signer)
        except OSError as exc:  # a full disk, a file size limit, a read-only folder...
            raise OSError(exc.errno, f"cannot write the signed archive: {exc.strerror or exc}",
                          dest) from exc

    return run_checks(
        lambda: open_input(source, workers=workers, storage_options=storage_options),
        source, Trust(), then=write,
    )  # fmt: skip
