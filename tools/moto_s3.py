"""A real S3 endpoint for tests and benchmarks: moto's standalone server on 127.0.0.1.

Used by the tests (``tests/helpers_s3.py``) and ``tools/bench_remote.py``; needs
``moto[server]`` and the ``cloud`` extra (s3fs).

The server runs in its own process on a free loopback port; :func:`s3_server` stops it
(SIGKILL, then waits) however the test ends. Requests go through the real client stack
(s3fs -> aiobotocore -> HTTP); :class:`GetCounter` adds up the ``Content-Length`` of every
``GetObject`` reply that the filesystem object's own client receives.

Example:
    >>> with s3_server() as s3:  # doctest: +SKIP
    ...     hkstore.save(model, s3.url("m.hkz"), storage_options=s3.options)
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec

__all__ = ["GetCounter", "S3Server", "s3_server"]

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class S3Server:
    """A running moto server and one bucket on it."""

    endpoint: str
    bucket: str
    options: dict[str, Any] = field(default_factory=dict)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def fs(self) -> Any:
        """The s3fs instance hkstore gets for :attr:`options` (fsspec caches instances)."""
        return fsspec.filesystem("s3", **self.options)

    def env(self) -> dict[str, str]:
        """A child process's environment that reaches this server by the AWS variables."""
        return dict(os.environ, AWS_ENDPOINT_URL=self.endpoint, **CREDENTIALS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def s3_server(timeout: float = 30.0) -> Iterator[S3Server]:
    """Start moto's S3 server on a free loopback port with one empty bucket; stop it after."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, **CREDENTIALS),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on {endpoint}") from None
                time.sleep(0.05)
        import boto3

        bucket = f"hk-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                     aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        yield S3Server(endpoint, bucket, options)
    finally:
        proc.kill()
        proc.wait()


class GetCounter:
    """Counts ``GetObject`` replies and their bytes on one s3fs instance's client."""

    def __init__(self, fs: Any) -> None:
        fs.ls("")  # connects: the client exists from here on
        self.bytes = 0
        self.requests = 0
        self._events = fs.s3.meta.events
        self._events.register("after-call.s3.GetObject", self._on_get)

    def _on_get(self, parsed: dict[str, Any], **_: Any) -> None:
        self.bytes += int(parsed.get("ContentLength", 0))
        self.requests += 1

    def reset(self) -> None:
        self.bytes = self.requests = 0

    def close(self) -> None:
        self._events.unregister("after-call.s3.GetObject", self._on_get)
