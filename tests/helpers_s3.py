"""The S3 test server (moto on loopback) and the GET counter: ``tools/moto_s3.py``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from moto_s3 import GetCounter, S3Server, s3_server

__all__ = ["GetCounter", "S3Server", "s3_server"]
