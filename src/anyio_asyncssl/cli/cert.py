"""``asyncssl cert``: write a self-signed certificate and its key, for tests and demos."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .common import KEY_TYPES, CLIError, fingerprint, generate, write_file


def add_parser(sub: Any) -> None:
    c = sub.add_parser("cert", help="write a self-signed certificate and key (tests, demos)",
                       description="Make a self-signed certificate and its private key with "
                       "the system OpenSSL.  Nothing trusts it until you pass it as a CA "
                       "(asyncssl connect --cafile, curl --cacert).")
    c.add_argument("--key-type", choices=list(KEY_TYPES), default="rsa2048")
    c.add_argument("--hostname", default="localhost", help="subject CN and first DNS name")
    c.add_argument("--san", action="append", metavar="NAME",
                   help="another DNS name or IP address (repeatable; default 127.0.0.1 and ::1)")
    c.add_argument("--days", type=int, default=30, help="validity (default 30 days)")
    c.add_argument("--cert-out", default="cert.pem", metavar="PATH",
                   help="certificate file (default cert.pem)")
    c.add_argument("--key-out", default="key.pem", metavar="PATH",
                   help="private key file, mode 0600 (default key.pem)")
    c.add_argument("--force", action="store_true", help="overwrite existing files")
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.days <= 36500:
        raise CLIError(f"--days must be 1-36500, not {args.days}")
    if args.cert_out == args.key_out:
        raise CLIError("--cert-out and --key-out name the same file")
    for path in (args.cert_out, args.key_out):
        if os.path.exists(path) and not args.force:
            raise CLIError(f"{path} exists: pass --force to overwrite it")
    try:
        gen = generate(args.key_type, args.hostname, args.san, days=args.days)
    except ValueError as exc:
        raise CLIError(f"cannot make the certificate: {exc}") from None
    write_file(args.cert_out, gen.cert_pem, what="certificate")
    write_file(args.key_out, gen.key_pem, private=True, what="key")
    print(f"asyncssl: wrote {args.cert_out} and {args.key_out}: {gen.description}, "
          f"valid {args.days} days")
    print(f"asyncssl: SHA-256 fingerprint {fingerprint(gen.cert_pem)}")
    return 0
