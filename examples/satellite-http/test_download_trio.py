"""The same download from a trio test: the client is the test's own code (a socket made in the
client node), the lab is shared by both cases (``satlab_session``: built once, pep switched
between them). Needs pytest-trio."""

import hashlib
import os
import sys

import pytest

pytest.importorskip("pytest_trio")
import trio

SIZE = 1_000_000
PORT = 8001


@pytest.mark.trio
@pytest.mark.satlab("geo", pep=["none", "peer"])
async def test_a_trio_client_downloads_the_file_byte_exact(satlab_session, tmp_path):
    lab = satlab_session
    data = os.urandom(SIZE)
    (tmp_path / "file.bin").write_bytes(data)
    server = lab.addr("server")
    serve = [sys.executable, "-m", "http.server", str(PORT), "--bind", server]
    lab.start("server", [*serve, "--directory", str(tmp_path)], listen=PORT)
    with trio.fail_after(120):
        stream = await lab.open_tcp_stream("client", server, PORT)
        async with stream:
            await stream.send_all(b"GET /file.bin HTTP/1.0\r\nHost: server\r\n\r\n")
            response = b""
            while chunk := await stream.receive_some(65536):
                response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
