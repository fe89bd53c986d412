"""`contracts.settler.read_http_response`: the hand-rolled HTTP/1.1 reader of `SlotSender`.

The node's answers (anvil: ``Content-Length`` bodies on a keep-alive connection) are read
without ``http.client``; a chunked body, a closing server, a body without a length and a broken
answer must come out as ``http.client`` would have them, or raise its errors, which make
`SlotSender` reconnect and send once more.
"""

from __future__ import annotations

import http.client
import io

import pytest

from contracts.settler import read_http_response


def _stream(raw: bytes) -> io.BufferedReader:
    return io.BufferedReader(io.BytesIO(raw))


def test_a_content_length_body_leaves_the_next_response_in_the_stream() -> None:
    body = b'[{"jsonrpc":"2.0","id":1,"result":"0x1"}]'
    one = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    reader = _stream(one + one)
    assert read_http_response(reader) == (200, body, False)
    assert read_http_response(reader) == (200, body, False)


def test_a_chunked_body_with_trailers_is_joined() -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\n[1,2\r\n3;ext=1\r\n,3]\r\n0\r\nX-Trailer: y\r\n\r\n"
        b"HTTP/1.1 500 Internal\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    reader = _stream(raw)
    assert read_http_response(reader) == (200, b"[1,2,3]", False)
    assert read_http_response(reader) == (500, b"", True)


def test_a_body_without_length_runs_to_the_close() -> None:
    assert read_http_response(_stream(b"HTTP/1.1 200 OK\r\n\r\n[]")) == (200, b"[]", True)
    raw = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n[]"
    assert read_http_response(_stream(raw)) == (200, b"[]", True)


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"", http.client.BadStatusLine),  # the node closed the idle connection
        (b"garbage\r\n\r\n", http.client.BadStatusLine),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n[1]", http.client.IncompleteRead),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\n[1]",
            http.client.IncompleteRead,
        ),
    ],
)
def test_a_broken_answer_raises_what_http_client_raises(raw: bytes, error: type) -> None:
    with pytest.raises(error):
        read_http_response(_stream(raw))
