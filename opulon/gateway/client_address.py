"""Which client a request comes from, for the per-client look-up throttle (hashed, in memory).

Behind a TLS-terminating proxy every request's peer is the proxy, so all visitors would share
one throttle. When the peer is one of the operator's trusted proxies
(``--forwarded-allow-ips``), the client is the right-most ``X-Forwarded-For`` address that is
not itself a trusted proxy: the left part of that header is whatever the client wrote.

An IPv6 client is its /64: one host is given a whole /64 and could otherwise take a fresh
address for every guess.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_trusted(values: Iterable[str]) -> tuple[Network, ...]:
    """Addresses or networks (``10.0.0.1``, ``10.0.0.0/8``, ``::1``), comma-separated allowed.

    Raises ValueError naming a bad entry.
    """
    networks: list[Network] = []
    for value in values:
        for part in value.split(","):
            text = part.strip()
            if not text:
                continue
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise ValueError(f"invalid address or network {text!r}") from None
    return tuple(networks)


def _trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def client_address(peer: str, forwarded_for: list[str], trusted: Sequence[Network]) -> str:
    """The client: the peer's address, or the one its trusted proxies forwarded (IPv6: its /64)."""
    return _client(_forwarded(peer, forwarded_for, trusted))


def _forwarded(peer: str, forwarded_for: list[str], trusted: Sequence[Network]) -> str:
    if not trusted or not _trusted(peer, trusted):
        return peer
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer


def _client(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return address
