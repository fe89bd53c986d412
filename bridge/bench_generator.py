"""The `--mqtt` bench's load generator: every device's telemetry at QoS 1, at the broker's pace.

A process of its own (so it does not share the bridge's GIL) with several MQTT connections, each
carrying a share of the devices. Packets are encoded ahead of the clock (MQTT 3.1.1 PUBLISH,
QoS 1, one packet id each) and a slot is written on each connection in one `sendall`; the slot
is done when the broker acknowledged every packet (PUBACK). paho, one connection, measured
1,300-3,200 msg/s here with its per-publish Python work and thread hand-offs, close to the
bridge's own rate, so it could not tell whose limit a figure was; this generator is not the
subject of the bench and costs a few system calls a slot.

Protocol (stdin/stdout with `bridge.bench_mqtt`): prints "ready" once connected and the births
are acknowledged; then for each line "K" publishes slot K and prints the seconds it took (first
byte written to last PUBACK read); "end" disconnects.
"""

from __future__ import annotations

import selectors
import socket
import sys
import time
from pathlib import Path

#: Connections the devices are spread over (round robin by device order).
CONNECTIONS = 4


def _varint(n: int) -> bytes:
    """MQTT's remaining-length encoding."""
    out = bytearray()
    while True:
        n, byte = divmod(n, 128)
        out.append(byte | (128 if n else 0))
        if not n:
            return bytes(out)


def _string(text: bytes) -> bytes:
    return len(text).to_bytes(2, "big") + text


def connect_packet(client_id: str) -> bytes:
    """CONNECT, MQTT 3.1.1, clean session, keep-alive off (the bench paces itself)."""
    body = (
        _string(b"MQTT") + bytes([4, 0x02]) + (0).to_bytes(2, "big") + _string(client_id.encode())
    )
    return b"\x10" + _varint(len(body)) + body


def publish_packet(topic: str, payload: bytes, packet_id: int) -> bytes:
    """PUBLISH at QoS 1 (not retained) with `packet_id` (1..65535)."""
    body = _string(topic.encode()) + packet_id.to_bytes(2, "big") + payload
    return b"\x32" + _varint(len(body)) + body


class Connection:
    """One device-side connection: publish a blob of packets, count the PUBACKs back."""

    def __init__(self, port: int, client_id: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(connect_packet(client_id))
        connack = self._read_exact(4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise ConnectionError(f"broker refused the generator: CONNACK {connack.hex()}")
        self.buffer = b""
        self.next_id = 1

    def _read_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("broker closed the generator's connection")
            data += chunk
        return data

    def encode(self, messages: list[tuple[str, bytes]]) -> bytes:
        packets = []
        for topic, payload in messages:
            packets.append(publish_packet(topic, payload, self.next_id))
            self.next_id = self.next_id % 65_535 + 1
        return b"".join(packets)

    def acks(self, data: bytes) -> int:
        """PUBACKs in `data` (with what was left over from the last read)."""
        buf = self.buffer + data
        count = 0
        i = 0
        while len(buf) - i >= 2:
            kind = buf[i] >> 4
            length, j, shift = 0, i + 1, 0
            while True:  # remaining length
                if j >= len(buf):
                    self.buffer = buf[i:]
                    return count
                length |= (buf[j] & 127) << shift
                shift += 7
                j += 1
                if not buf[j - 1] & 128:
                    break
            if j + length > len(buf):
                break
            if kind == 4:
                count += 1
            i = j + length
        self.buffer = buf[i:]
        return count


def publish_all(connections: list[Connection], blobs: list[bytes], expected: list[int]) -> None:
    """Write each connection's blob and wait for all its PUBACKs (30 s at most)."""
    sel = selectors.DefaultSelector()
    for conn, blob in zip(connections, blobs, strict=True):
        conn.sock.sendall(blob)
    left = dict(enumerate(expected))
    for k, conn in enumerate(connections):
        if left[k]:
            sel.register(conn.sock, selectors.EVENT_READ, k)
    deadline = time.monotonic() + 30
    while any(left.values()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"generator: PUBACKs missing after 30 s: {left}")
        for key, _ in sel.select(1.0):
            k = key.data
            data = connections[k].sock.recv(65_536)
            if not data:
                raise ConnectionError("broker closed the generator's connection")
            left[k] -= connections[k].acks(data)
            if left[k] <= 0:
                sel.unregister(key.fileobj)
    sel.close()


def read_messages(path: Path) -> list[tuple[str, bytes]]:
    out = []
    for line in path.read_bytes().splitlines():
        t, _, payload = line.partition(b"\t")
        out.append((t.decode(), payload))
    return out


def split(messages: list[tuple[str, bytes]], n: int) -> list[list[tuple[str, bytes]]]:
    """Round robin by position: a device keeps its connection (its messages stay in order)."""
    return [messages[i::n] for i in range(n)]


def main(port: int, directory: Path, n_connections: int = CONNECTIONS) -> None:
    connections = [Connection(port, f"bench-devices-{i}") for i in range(n_connections)]

    def encode(name: str) -> tuple[list[bytes], list[int]]:
        shares = split(read_messages(directory / name), n_connections)
        blobs = [c.encode(share) for c, share in zip(connections, shares, strict=True)]
        return blobs, [len(s) for s in shares]

    publish_all(connections, *encode("births"))
    # Every slot's packets before "ready", so none of the encoding is in the bridge's figures.
    slots = {
        int(p.name[4:]): encode(p.name) for p in directory.iterdir() if p.name.startswith("slot")
    }
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "end":
            break
        started = time.monotonic()
        publish_all(connections, *slots[int(line)])
        print(time.monotonic() - started, flush=True)
    for c in connections:
        c.sock.sendall(b"\xe0\x00")  # DISCONNECT
        c.sock.close()


if __name__ == "__main__":
    main(
        int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else CONNECTIONS
    )
