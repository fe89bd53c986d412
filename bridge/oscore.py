"""OSCORE (RFC 8613) between the bridge and each CoAP device: pre-shared contexts, on disk.

CoAP runs over plain UDP, so without object security anyone on the device's network could read
its telemetry and, worse, command its battery. MQTT devices get TLS, a password and an ACL from
the broker; a CoAP device gets OSCORE instead: every request and response between the bridge and
that device is encrypted and authenticated end to end (AES-CCM-16-64-128, keys derived with
HKDF-SHA256 from a master secret shared by the two ends only), each request carries a sequence
number the receiver takes at most once (its replay window), and a message under another key
does not decrypt. A device (or the simulator's gateway) refuses every request to its resources
that is not protected by *its own* context with 4.01 Unauthorized.

Each context is a folder in aiocoap's `FilesystemSecurityContext` layout: `settings.json` (ids,
salt, algorithms), `secret.json` (the master secret, mode 0600) and `sequence.json`, which holds
the next sequence number to send and the replay window. aiocoap writes sequence numbers ahead
in chunks (RFC 8613 appendix B.1.1) and marks the window unknown while it changes, so neither
survives a crash into a reused nonce or an accepted replay: after a crash the receiver asks the
sender to prove freshness once (the Echo option, appendix B.1.2), which aiocoap's client answers
by itself. A lock file keeps two processes from using one context.

`provision` writes both ends of one context per device: `<out>/bridge/<device>/` for the bridge
(`coap.oscore_dir`) and `<out>/devices/<device>/` for the device (`devices simulate --coap-oscore`
for simulated ones; a real device is flashed with its folder's values). A context must only ever
be *moved*, never copied and used twice: a copy would reuse sequence numbers, which breaks
AES-CCM. Renewing writes a fresh secret, so both ends must take the new folder.

A *reader* (the shadow bridge of `bridge run --dry-run`, say) gets contexts of its own:
`provision(..., reader="shadow")` writes `<out>/readers/shadow/<device>/` for the reader
(`coap.shadow_oscore_dir`) and `<out>/devices/<device>/readers/shadow/` for the device, inside
the device's folder, so a device flashed with its folder holds its readers too. Sharing the
live bridge's contexts instead is unsound: used by two processes at once, a context sends two
messages under one sequence number (a reused AES-CCM nonce, which leaks the plaintexts' XOR and
lets a forger in), and each side's replay window refuses the other's requests. The lock file
forbids it, so a shadow on the live contexts would either be refused or, started first, keep
the live bridge from starting. A reader's context is also *read-only* on the device: it may
observe and fetch (`birth`, `death`, `data`, `log`, `dr`), but a command or a DR event under it
is refused with 4.03 (`read_only`), so a shadow, or whoever takes its files, can watch a site
but never command it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import filelock
from aiocoap import oscore
from aiocoap.credentials import CredentialsMap

from bridge.errors import ConfigError

ALGORITHM = "AES-CCM-16-64-128"
"""RFC 8613's mandatory algorithm: 8-byte tags, so a short command stays one small datagram."""
HASH = "sha256"
ID_BYTES = 6
"""Sender and recipient ids: random, so the contexts of devices behind one gateway port (which
finds a context by the id it receives) do not collide; 7 bytes is the algorithm's maximum."""
SEQUENCE_CHUNK = 1_000
"""Sequence numbers reserved on disk at once (aiocoap doubles the step up to 10,000): each
reservation is an fsync that blocks the event loop (~10 ms on a busy disk), and a crash skips at
most this many numbers of the 2^40 a context has."""
SECRET_BYTES = 32
SALT_BYTES = 8
BRIDGE_SIDE = "bridge"
DEVICE_SIDE = "devices"
READERS = "readers"
"""`<out>/readers/<reader>/<device>/`, and `<out>/devices/<device>/readers/<reader>/`."""
READER_PATTERN = r"[a-z][a-z0-9_-]{0,31}"
CONTEXT_FILES = ("settings.json", "secret.json", "sequence.json", "lock")

#: Why an OSCORE message was refused (`bridge_coap_oscore_refusals_total{reason}` on the bridge,
#: `CoapDeviceServer.refusals` on the device side).
UNPROTECTED = "unprotected"
"""A plain request to a protected device resource (answered 4.01)."""
UNKNOWN_CONTEXT = "unknown_context"
"""A protected request under a sender id the device does not know (answered 4.01)."""
WRONG_DEVICE = "wrong_device"
"""A request protected by another device's context, to this device (answered 4.01)."""
REPLAYED = "replayed"
"""A sequence number already taken: a replayed request (answered 4.01)."""
BAD_KEY = "bad_key"
"""The message did not decrypt: another key, or altered on the way (answered 4.00)."""
MALFORMED = "malformed"
"""The OSCORE option or the COSE object could not be parsed."""
READ_ONLY = "read_only"
"""A command or DR event under a reader's context, which may only read (answered 4.03)."""


class DeviceContext(oscore.FilesystemSecurityContext):
    """One device's pre-shared context that counts the messages it refuses, by reason."""

    def __init__(self, basedir: str, refusals: Counter[str]) -> None:
        self.refusals = refusals
        try:
            super().__init__(basedir, sequence_number_chunksize_start=SEQUENCE_CHUNK)
        except BaseException:
            # aiocoap took the lock before reading the files: free it, or a half-loaded context
            # holds it (and its finalizer fails) until garbage collection.
            lock, self.lockfile = getattr(self, "lockfile", None), None
            if lock is not None:
                lock.release()
            raise

    def unprotect(self, protected_message: Any, request_id: Any = None) -> Any:
        try:
            return super().unprotect(protected_message, request_id)
        except oscore.ReplayErrorWithEcho:
            # Not a refusal: the window was lost in a crash and the sender is asked to prove
            # freshness (aiocoap's client answers the Echo by itself).
            raise
        except oscore.ReplayError:
            self.refusals[REPLAYED] += 1
            raise
        except oscore.DecodeError:
            self.refusals[MALFORMED] += 1
            raise
        except oscore.ProtectionInvalid:
            self.refusals[BAD_KEY] += 1
            raise


class CountingCredentials(CredentialsMap):
    """A device server's contexts, counting protected requests under an id it does not know."""

    def __init__(self, refusals: Counter[str]) -> None:
        super().__init__()
        self.refusals = refusals

    def find_oscore(self, unprotected: Any) -> Any:
        try:
            return super().find_oscore(unprotected)
        except KeyError:
            self.refusals[UNKNOWN_CONTEXT] += 1
            raise


def _write_json(path: Path, data: dict[str, str], mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)


def _write_context(
    folder: Path, sender: bytes, recipient: bytes, secret: bytes, salt: bytes
) -> None:
    """A fresh context in `folder`; what else the folder holds (a device's readers) stays."""
    folder.mkdir(parents=True, mode=0o700, exist_ok=True)
    for name in CONTEXT_FILES:
        (folder / name).unlink(missing_ok=True)
    settings = {
        "algorithm": ALGORITHM,
        "kdf-hashfun": HASH,
        "sender-id_hex": sender.hex(),
        "recipient-id_hex": recipient.hex(),
        "salt_hex": salt.hex(),
    }
    _write_json(folder / "settings.json", settings, 0o644)
    _write_json(folder / "secret.json", {"secret_hex": secret.hex()}, 0o600)


def reader_folder(out: Path, reader: str) -> Path:
    """Where a reader's ends of its contexts go (its `coap.shadow_oscore_dir`)."""
    if not re.fullmatch(READER_PATTERN, reader):
        raise ConfigError(f"reader: expected a name matching {READER_PATTERN}, got {reader!r}")
    return out / READERS / reader


def provision(
    devices: Iterable[str], out: Path, *, renew: bool = False, reader: str | None = None
) -> dict[str, list[str]]:
    """Write a fresh pre-shared context per device, both ends; what was written and kept.

    A device that already has both ends is kept as it is (its sequence numbers and replay window
    go on), unless `renew`: then both ends are replaced by a new secret and new ids. With
    `reader`, the contexts are that reader's (read-only on the device), beside the live ones.
    """
    written: list[str] = []
    kept: list[str] = []
    for device in devices:
        if reader is None:
            bridge_end, device_end = out / BRIDGE_SIDE / device, out / DEVICE_SIDE / device
        else:
            bridge_end = reader_folder(out, reader) / device
            device_end = out / DEVICE_SIDE / device / READERS / reader
        complete = (bridge_end / "secret.json").exists() and (device_end / "secret.json").exists()
        if not renew and complete:
            kept.append(device)
            continue
        bridge_id, device_id = secrets.token_bytes(ID_BYTES), secrets.token_bytes(ID_BYTES)
        secret, salt = secrets.token_bytes(SECRET_BYTES), secrets.token_bytes(SALT_BYTES)
        _write_context(bridge_end, bridge_id, device_id, secret, salt)
        _write_context(device_end, device_id, bridge_id, secret, salt)
        written.append(device)
    return {"written": written, "kept": kept}


def load_contexts(
    folder: Path, devices: Iterable[str], field: str, refusals: Counter[str]
) -> dict[str, DeviceContext]:
    """Each device's context from `<folder>/<device>/`, locked for this process.

    A missing, unreadable or incomplete context, or one another process holds, raises
    ConfigError naming `field`; what was loaded before the failure is released again.
    """
    out: dict[str, DeviceContext] = {}
    try:
        for device in devices:
            path = folder / device
            if not path.is_dir():
                raise ConfigError(
                    f"{field}: expected an OSCORE context folder for {device} at {path} "
                    "(microgrid devices oscore writes one per device)"
                )
            try:
                out[device] = DeviceContext(str(path), refusals)
            except filelock.Timeout:
                raise ConfigError(
                    f"{field}: the OSCORE context of {device} at {path} is in use by another "
                    "process (its `lock`); a context must never be used by two at once"
                ) from None
            except (oscore.FilesystemSecurityContext.LoadError, ValueError, OSError) as exc:
                raise ConfigError(
                    f"{field}: expected a complete OSCORE context for {device} at {path} "
                    f"(settings.json and secret.json: sender-id, recipient-id, secret): {exc}"
                ) from None
    except ConfigError:
        release(out.values())
        raise
    return out


def load_reader_contexts(
    folder: Path, devices: Iterable[str], field: str, refusals: Counter[str]
) -> dict[str, dict[str, DeviceContext]]:
    """Each device's reader contexts, `<folder>/<device>/readers/<reader>/`, locked: device ->
    reader -> context (a device without readers is left out). Errors as `load_contexts`."""
    out: dict[str, dict[str, DeviceContext]] = {}
    try:
        for device in devices:
            readers = folder / device / READERS
            if not readers.is_dir():
                continue
            names = sorted(p.name for p in readers.iterdir() if p.is_dir())
            out[device] = load_contexts(readers, names, f"{field} ({device}'s readers)", refusals)
    except ConfigError:
        for contexts in out.values():
            release(contexts.values())
        raise
    return out


def check_contexts(folder: Path, devices: Iterable[str], field: str) -> None:
    """Raise ConfigError now, before anything connects, if a device's context will not load."""
    release(load_contexts(folder, devices, field, Counter()).values())


def release(contexts: Iterable[DeviceContext]) -> None:
    """Persist each context's sequence number and replay window, and unlock it.

    aiocoap's own clean-up (on garbage collection) also writes a replay window it never had,
    which a later load cannot read; a window lost in a crash stays `unknown` here, so the next
    start recovers it with Echo instead.
    """
    for ctx in contexts:
        if ctx.lockfile is None:
            continue
        window_known = ctx.recipient_replay_window.is_initialized()
        unchanged = (
            ctx.sequence_number_persisted == ctx.sender_sequence_number
            and ctx.replay_window_persisted
        )
        if not unchanged:  # (an fsync each: `check_contexts` and idle contexts write nothing)
            if window_known:
                ctx.replay_window_persisted = True
            ctx.sequence_number_persisted = ctx.sender_sequence_number
            with contextlib.suppress(OSError):
                ctx._store()
        lock, ctx.lockfile = ctx.lockfile, None
        with contextlib.suppress(OSError):
            os.unlink(lock.lock_file)
        lock.release()


def refusal(exc: BaseException) -> str | None:
    """Why the device refused the bridge's protected request, from the error aiocoap raised;
    None when it is no OSCORE error.

    A device that cannot take a request under OSCORE answers it *unprotected* (it has no key it
    could protect the answer with): 4.01 for an unknown sender id or a replay, 4.00 for a
    request that does not decrypt, which the bridge sees as `NotAProtectedMessage`. Errors in
    unprotecting the device's own answers are counted by `DeviceContext` itself.
    """
    if isinstance(exc, oscore.NotAProtectedMessage):
        plain = getattr(exc, "plain_message", None)
        code = getattr(plain, "code", None)
        if code is None:
            return "device_refused"
        n = int(code)
        return f"device_refused_{n >> 5}.{n & 31:02d}"
    if isinstance(exc, oscore.ProtectionInvalid | oscore.ContextUnavailable):
        return "unprotect_failed"
    return None
