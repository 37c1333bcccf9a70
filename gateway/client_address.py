"""Which address a request came from: the socket peer, or what a trusted proxy says.

Behind a load balancer every request's peer is the balancer. Its `X-Forwarded-For`
or RFC 7239 `Forwarded` header names the client, but a client can send those headers
too: they are read only when the peer is one of `server.trusted_proxies`, and then
from the right, where our own proxies wrote, skipping every address that is itself a
trusted proxy. The first address that is not is the client. Entries to its left were
written by the client or by proxies we do not know, so they are never read.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from aiohttp import web

from gateway.config import Network

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

UNKNOWN = "unknown"
# The client's address, kept on a request whose authentication failed (for its log line).
CLIENT_ADDRESS = web.RequestKey("client_address", str)


def client_address(request: web.Request, trusted: tuple[Network, ...]) -> str:
    """The client's address as text: the peer, unless the peer is a trusted proxy.

    When both `Forwarded` and `X-Forwarded-For` are present and name different
    clients, one of them was written by the client (our proxy only maintains one of
    them and passes the other through): neither is believed and the peer is the answer.
    """
    peer_text = request.remote or UNKNOWN
    peer = _parse(peer_text)
    if peer is None or not _within(peer, trusted):
        return str(peer) if peer is not None else peer_text
    forwarded = [element.get("for") for element in request.forwarded]
    if all(entry is None for entry in forwarded):
        forwarded = []  # only `proto=` or `host=`: a Forwarded header that names no one
    x_forwarded_for = [
        item for header in request.headers.getall("X-Forwarded-For", ()) for item in header.split(",")
    ]
    claims = [_rightmost_untrusted(peer, chain, trusted) for chain in (forwarded, x_forwarded_for) if chain]
    if not claims or any(claim != claims[0] for claim in claims):
        return str(peer)
    return str(claims[0])


def _rightmost_untrusted(peer: Address, chain: Sequence[str | None], trusted: tuple[Network, ...]) -> Address:
    """Walk the chain from the right past trusted proxies. An entry that is not an
    address (`unknown`, an obfuscated name, garbage) ends the walk at the hop that wrote
    it: what lies further left cannot be told from what a client made up."""
    nearest = peer
    for entry in reversed(chain):
        address = _parse(entry)
        if address is None:
            return nearest
        if not _within(address, trusted):
            return address
        nearest = address
    return nearest


def _parse(text: str | None) -> Address | None:
    """An address from a peer or header entry: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`,
    `[2001:db8::1]:80`; IPv4-mapped IPv6 as IPv4. None for anything else."""
    if text is None:
        return None
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _within(address: Address, networks: tuple[Network, ...]) -> bool:
    return any(address in network for network in networks)
