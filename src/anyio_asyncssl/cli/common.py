"""What the ``asyncssl`` subcommands share: argument types, key material, errors.

Every error a user can cause becomes a :class:`CLIError` with one line that
names what failed (host, port, file); ``main`` prints it and exits 1.
Argument values that cannot be right are refused by argparse (exit 2).
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import importlib.util
import os
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

from ..context import TLSContext
from ..errors import TLSError
from ..selfsigned import generate_self_signed

#: --key-type values: (OpenSSL key type, bits)
KEY_TYPES: dict[str, tuple[str, int]] = {
    "rsa2048": ("rsa", 2048),
    "rsa3072": ("rsa", 3072),
    "rsa4096": ("rsa", 4096),
    "p256": ("ec", 256),
}


class CLIError(Exception):
    """A failure the user caused or can fix: printed as one line, exit status 1."""


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0-65535 (0: any free port)."""
    try:
        port = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range (0-65535)")
    return port


def worker_count(text: str) -> int:
    """argparse type: a number of offload worker threads, 0-1024."""
    try:
        n = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of workers: {text!r}") from None
    if not 0 <= n <= 1024:
        raise argparse.ArgumentTypeError(f"workers must be 0-1024, not {n}")
    return n


def positive_seconds(text: str) -> float:
    """argparse type: a duration in seconds, > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


def host_and_port(args: list[str]) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``HOST PORT``."""
    if len(args) == 2:
        host, port_text = args
    elif len(args) == 1:
        text = args[0]
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            port_text = rest[1:] if sep and rest.startswith(":") else ""
        else:
            host, _, port_text = text.rpartition(":")
        if not host or not port_text:
            raise CLIError(f"expected HOST:PORT or HOST PORT, got {text!r}")
    else:
        raise CLIError("expected HOST:PORT or HOST PORT")
    try:
        return host, port_number(port_text)
    except argparse.ArgumentTypeError as exc:
        raise CLIError(str(exc)) from None


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 fingerprint of a PEM certificate, as ``openssl x509 -fingerprint`` prints it."""
    return fingerprint_der(ssl.PEM_cert_to_DER_cert(cert_pem.decode("ascii")))


def fingerprint_der(der: bytes) -> str:
    """SHA-256 fingerprint of a DER certificate (colon-separated hex)."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def have_trio() -> bool:
    return importlib.util.find_spec("trio") is not None


def need_trio(what: str) -> None:
    """Refuse, in one line, what needs the optional trio."""
    if not have_trio():
        raise CLIError(f"{what} needs trio: pip install 'anyio-asyncssl[trio]'")


def add_password_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--password", help="password of an encrypted --key (visible to ps: "
                   "prefer --password-file or the prompt)")
    g.add_argument("--password-file", metavar="PATH",
                   help="read the key's password from the first line of this file")


def password_source(args: argparse.Namespace, key_path: str) -> object:
    """What ``load_cert_chain(password=)`` gets: asked for only if the key is encrypted."""
    if args.password is not None:
        return args.password
    if args.password_file is not None:
        try:
            with open(args.password_file, "rb") as f:
                return f.readline().rstrip(b"\r\n")
        except OSError as exc:
            raise CLIError(f"cannot read password file {args.password_file}: "
                           f"{exc.strerror or exc}") from None

    def ask() -> str:
        if not sys.stdin.isatty():
            raise CLIError(f"key file {key_path} is encrypted: pass --password-file PATH "
                           "(or --password)")
        return getpass.getpass(f"password for {key_path}: ")

    return ask


def load_key_pair(ctx: TLSContext, args: argparse.Namespace, cert: str,
                  key: str | None) -> None:
    """``ctx.load_cert_chain`` with every failure as one line naming the file."""
    key_path = key or cert
    for path, what in ((cert, "certificate file"), (key_path, "key file")):
        if not os.path.exists(path):
            raise CLIError(f"{what} {path}: no such file")
        if not os.access(path, os.R_OK):
            raise CLIError(f"{what} {path}: permission denied")
    try:
        ctx.load_cert_chain(cert, key, password=password_source(args, key_path))  # type: ignore[arg-type]
    except CLIError:
        raise
    except TLSError as exc:
        text = str(exc)
        reason = (getattr(exc, "reason", None) or "").upper()
        if "MISMATCH" in reason or "does not match" in text:
            raise CLIError(f"key file {key_path} does not match certificate {cert}") from None
        if "BAD_DECRYPT" in reason or "password" in text.lower() or "decrypt" in text.lower():
            raise CLIError(f"cannot decrypt key file {key_path}: wrong password?") from None
        raise CLIError(f"cannot load {cert} / {key_path}: {text}") from None
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot load {cert} / {key_path}: {exc}") from None


@dataclass
class Generated:
    cert_pem: bytes
    key_pem: bytes
    description: str


def generate(key_type: str, hostname: str, sans: list[str] | None = None,
             days: int = 30) -> Generated:
    kind, bits = KEY_TYPES[key_type]
    names = sans if sans is not None else ["127.0.0.1", "::1"]
    cert, key = generate_self_signed(hostname, key_type=kind, bits=bits, days=days,
                                     extra_names=names)
    return Generated(cert, key, f"self-signed {key_type.upper()} certificate for "
                                f"{', '.join([hostname, *names])}")


def write_file(path: str, data: bytes, *, private: bool = False, what: str = "file") -> None:
    """Write ``data`` to ``path`` (mode 0600 for a private key); errors name the path."""
    try:
        if private:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        else:
            Path(path).write_bytes(data)
    except OSError as exc:
        raise CLIError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
