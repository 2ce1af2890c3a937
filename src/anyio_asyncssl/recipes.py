"""aiohttp's client on a :class:`~anyio_asyncssl.TLSContext`: :class:`TLSConnector`.

Install with ``pip install aiohttp``.

Theory of operation
-------------------
Servers built on asyncio (uvicorn, aiohttp's ``web``, hypercorn's asyncio
worker) need no helper: they hand the context they are given to
``loop.create_server(ssl=...)`` or ``asyncio.start_server(ssl=...)``
untouched, and a loop from :func:`anyio_asyncssl.asyncio.new_event_loop`
serves a ``TLSContext`` there (``examples/uvicorn_app.py`` and
``examples/aiohttp_app.py`` are the recipes).  aiohttp's
*client* is the exception: it checks the type of what it is given
(``isinstance(ssl, SSLContext | bool | Fingerprint)`` in
``aiohttp/client_reqrep.py``, ``_merge_ssl_params``, read from aiohttp
3.14), so a ``TLSContext`` passed as ``ssl=`` to ``ClientSession``,
``TCPConnector`` or a request is refused with ``TypeError``.

Past that check the connector does what a server does: its
``_get_ssl_context(req)`` picks the context for a request, and the
connector passes it, untouched, to ``loop.create_connection(ssl=...)``
(direct connections) or ``loop.start_tls()`` (HTTPS through a proxy).
:class:`TLSConnector` overrides that one method, so the connector's loop
(which must be one of ours) does the TLS with our context; everything else
(pooling, happy eyeballs, proxies, aiohttp's exceptions: a failed
certificate check is ``ClientConnectorCertificateError``, since our
:class:`~anyio_asyncssl.CertificateVerifyError` is an
``ssl.SSLCertVerificationError``) is aiohttp's own.

``_get_ssl_context`` is private to aiohttp, but it has had this signature
and role through aiohttp 3.x.  Should a later aiohttp rename it, the
override would be silently unused and HTTPS would go back to aiohttp's
stdlib contexts; ``tests/test_asyncio_servers.py`` checks what the server
saw and the offload's counters, so it would notice.
"""

from __future__ import annotations

import asyncio
from typing import Any

from . import asyncio as _tls_asyncio
from .context import TLSContext, require_tls_context

try:
    from aiohttp import ClientRequest, TCPConnector
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("anyio_asyncssl.recipes needs aiohttp: pip install aiohttp") from exc

__all__ = ["TLSConnector"]


class TLSConnector(TCPConnector):
    """aiohttp's ``TCPConnector``, with HTTPS done by our TLS on ``ssl`` (a ``TLSContext``).

    ``ClientSession(connector=TLSConnector(ssl=context))``: every request
    made with the default ``ssl=True`` uses ``context`` (certificate and
    host-name checks, ALPN, a client certificate, private-key offload are
    the context's).  A request that passes its own ``ssl=`` (``False``, an
    ``aiohttp.Fingerprint`` or a stdlib ``ssl.SSLContext``) keeps aiohttp's
    meaning and the stdlib's TLS.  Other keywords are ``TCPConnector``'s.

    Must be made on (or given as ``loop=``) a loop from
    :func:`anyio_asyncssl.asyncio.new_event_loop` (or
    ``new_uvloop_event_loop``); raises ``TypeError`` on another loop or
    for an ``ssl`` that is not a ``TLSContext``.
    """

    def __init__(self, *, ssl: TLSContext, **kwargs: Any) -> None:
        context = require_tls_context(ssl, "ssl")
        loop = kwargs.get("loop") or asyncio.get_running_loop()
        if not _tls_asyncio.is_tls_loop(loop):
            raise TypeError(
                f"TLSConnector needs a loop from anyio_asyncssl.asyncio.new_event_loop(), "
                f"not {type(loop).__name__}: run the client with "
                f"asyncio.Runner(loop_factory=anyio_asyncssl.asyncio.new_event_loop)")
        super().__init__(**kwargs)
        self._tls_context = context

    @property
    def tls_context(self) -> TLSContext:
        """The context HTTPS requests use."""
        return self._tls_context

    def _get_ssl_context(self, req: ClientRequest) -> Any:
        # aiohttp: None for http://, else the request's or the connector's
        # stdlib context; ours for https:// requests that did not choose
        if req.is_ssl() and req.ssl is True:
            return self._tls_context
        return super()._get_ssl_context(req)
