"""An HTTP download over a GEO satellite link, without and with pep: it must complete, and the
client must get exactly the bytes the server has.

The ``satlab`` fixture (pep's pytest plugin) builds the link in network namespaces for each
case, client -- pepa -- link -- pepb -- server, and removes it afterwards, also when the test
fails. Needs root: without it the test is skipped, with the reason.
"""

import hashlib
import os
import sys
import time

import pytest

SIZE = 2_000_000
PORT = 8000


@pytest.fixture
def website(tmp_path):
    """A directory with one file of random bytes, and its sha256."""
    www = tmp_path / "www"
    www.mkdir()
    data = os.urandom(SIZE)
    (www / "file.bin").write_bytes(data)
    return www, hashlib.sha256(data).hexdigest()


@pytest.mark.satlab("geo", pep=["none", "peer"])
def test_curl_downloads_the_file_byte_exact(satlab, website, tmp_path):
    www, sha256 = website
    server = satlab.addr("server")
    # Python's own web server in the server node, stopped when the test ends; start() returns
    # once it listens.
    serve = [sys.executable, "-m", "http.server", str(PORT), "--bind", server]
    satlab.start("server", [*serve, "--directory", str(www)], listen=PORT)
    got = tmp_path / "got.bin"
    t0 = time.monotonic()
    # Raises, naming the node and showing curl's stderr, if curl fails.
    url = f"http://{server}:{PORT}/file.bin"
    satlab.run("client", ["curl", "-sS", "--fail", "-o", str(got), url], timeout=120)
    seconds = time.monotonic() - t0
    print(f"{satlab.profile.describe()}, pep {satlab.mode}: {SIZE:,} bytes in {seconds:.2f} s")

    assert hashlib.sha256(got.read_bytes()).hexdigest() == sha256
    if satlab.mode != "none":  # the bytes went through pep on the client's side of the link
        assert satlab.pep_status("pepa")["totals"]["bytes_down"] >= SIZE
