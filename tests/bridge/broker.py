"""A real mosquitto for the tests: TLS with a generated CA, a password per device, an ACL.

The ACL is the one docs/iot.md prescribes, written with mosquitto's ``%u`` patterns: a device's
broker user is its device id, so it may write only its own DBIRTH, DDEATH, DDATA and DACK and
read only its own DCMD and DREVENT (and the bridge's NBIRTH/NDEATH). The bridge user may do
everything under ``mgv1/``.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.bridge.services import free_port

ACL = """\
user {bridge}
topic readwrite mgv1/#

pattern write mgv1/+/DBIRTH/%u
pattern write mgv1/+/DDEATH/%u
pattern write mgv1/+/DDATA/%u
pattern write mgv1/+/DACK/%u
pattern read mgv1/+/DCMD/%u
pattern read mgv1/+/DREVENT/%u
pattern read mgv1/+/NBIRTH/+
pattern read mgv1/+/NDEATH/+
"""


@dataclass
class Broker:
    host: str
    port: int
    ca_file: Path
    passwords: dict[str, str]
    """User -> password; the bridge's user is ``bridge``."""
    directory: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtts://{self.host}:{self.port}"

    def stop(self) -> None:
        """A clean shutdown: mosquitto writes its persistence file (sessions, queued messages)."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def start(self) -> None:
        self.proc = _start(self.directory / "mosquitto.conf", self.port)

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


def _start(conf: Path, port: int) -> subprocess.Popen[bytes]:
    # Its log goes to a file: a pipe nobody reads fills up and blocks the broker.
    log = conf.with_suffix(".log")
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=sink
        )
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            err = log.read_text()[-500:]
            proc.kill()
            pytest.fail(f"mosquitto did not start: {err[:500]}")
        time.sleep(0.05)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def write_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 / localhost: (ca, cert, key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "microgrid test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = _key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(_pem_key(key))
    return paths


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if found is None:
        pytest.fail(
            "mosquitto is not installed: `make setup` installs it (apt-get install mosquitto)"
        )
    return found


@contextlib.contextmanager
def mosquitto(directory: Path, users: list[str], port: int | None = None) -> Iterator[Broker]:
    """Start mosquitto on loopback with TLS, one password per user (+ ``bridge``) and the ACL."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, cert, key = write_certificates(directory)
    passwords = {u: f"pw-{u}-{i}" for i, u in enumerate(["bridge", *users])}
    pwfile = directory / "passwd"
    pwfile.write_text("".join(f"{u}:{p}\n" for u, p in passwords.items()))
    subprocess.run(["mosquitto_passwd", "-U", str(pwfile)], check=True, capture_output=True)
    (directory / "acl").write_text(ACL.format(bridge="bridge"))
    port = port or free_port()
    conf = directory / "mosquitto.conf"
    conf.write_text(
        "per_listener_settings false\n"
        "allow_anonymous false\n"
        f"password_file {pwfile}\n"
        f"acl_file {directory / 'acl'}\n"
        # Persistence: a restarted broker still holds the bridge's session and the QoS 1
        # messages queued for it (written on a clean shutdown, and every few seconds).
        "persistence true\n"
        f"persistence_location {directory}/\n"
        "autosave_interval 5\n"
        "log_dest stderr\n"
        "log_type error\n"
        "log_type warning\n"
        "user root\n"
        "max_queued_messages 100000\n"
        f"listener {port} 127.0.0.1\n"
        f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
        "tls_version tlsv1.2\n"
    )
    broker = Broker("127.0.0.1", port, ca, passwords, directory)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
