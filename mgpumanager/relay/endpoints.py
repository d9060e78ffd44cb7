"""
Client endpoints for the consumers, built once per address.

The standard ``Agent`` endpoint factory builds a ``HostnameEndpoint`` for every
request, IDNA-encoding the host name each time, which costs more than the rest
of a pooled request.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import URI
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer


@implementer(IAgentEndpointFactory)
class ReusedEndpoints:
    """
    One client endpoint per consumer address, built once: the standard
    factory builds a ``HostnameEndpoint`` for every request, IDNA-encoding the
    host name each time, which costs more than the rest of a pooled request.
    """

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._endpoints[key] = self._build(uri)
        return endpoint

    def _build(self, uri: URI) -> IStreamClientEndpoint:
        tcp = HostnameEndpoint(
            self._reactor, uri.host, uri.port, timeout=self._connect_timeout
        )
        if uri.scheme == b"http":
            return tcp
        if uri.scheme != b"https":
            raise SchemeNotSupported(f"unsupported scheme {uri.scheme!r}")
        try:
            from twisted.internet.ssl import optionsForClientTLS
        except ImportError:
            raise SchemeNotSupported(
                "https consumers need TLS support (pip install 'twisted[tls]')"
            ) from None
        return wrapClientTLS(optionsForClientTLS(uri.host.decode("ascii")), tcp)
