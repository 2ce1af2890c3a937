"""The ``asyncssl`` command (also ``python -m anyio_asyncssl``).

``serve`` (serve.py) runs a TLS server, ``connect`` (connect.py) a client
in the manner of ``openssl s_client``, ``cert`` (cert.py) writes a
self-signed certificate, ``bench`` (bench.py) measures this library against
trio.SSLStream and anyio's TLSStream with the benchmark harness.  Every
error a user can cause is one line on stderr and exit status 1 (argparse's
usage errors: 2); Ctrl-C is 130.  Never a traceback for those: a traceback
here is a bug.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from .._ffi import OPENSSL_VERSION
from ..errors import TLSError
from . import bench, cert, connect, serve
from .common import CLIError

__all__ = ["CLIError", "build_parser", "main"]

VERSION = f"asyncssl {__version__} ({OPENSSL_VERSION})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asyncssl",
                                description="TLS on OpenSSL's async mode for anyio and trio")
    p.add_argument("--version", action="version", version=VERSION)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (serve, connect, cert, bench):
        module.add_parser(sub)
    for action in sub.choices.values():
        action.add_argument("--version", action="version", version=VERSION)
    return p


def _is_interrupt(exc: BaseException) -> bool:
    """Ctrl-C, possibly inside (nested) exception groups from task groups."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    subs: tuple[BaseException, ...] = tuple(getattr(exc, "exceptions", None) or ())
    return bool(subs) and all(_is_interrupt(e) for e in subs)


def _user_error(exc: BaseException) -> CLIError | None:
    """The CLIError inside (nested) exception groups, if that is all there is."""
    if isinstance(exc, CLIError):
        return exc
    subs: tuple[BaseException, ...] = tuple(getattr(exc, "exceptions", None) or ())
    found = [_user_error(e) for e in subs]
    return found[0] if found and all(found) else None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BaseException as exc:
        if _is_interrupt(exc):
            print("", file=sys.stderr)
            return 130
        err = _user_error(exc)
        if err is not None:
            print(f"asyncssl: {err}", file=sys.stderr)
            return 1
        if isinstance(exc, TLSError):
            print(f"asyncssl: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
