"""API-key and browser-Origin checks for the HTTP and websocket endpoints.

API key (`--api-key`): a request carries it as `Authorization: Bearer KEY`, or, for browsers (which cannot set
headers on a websocket), as the websocket subprotocol `openai-insecure-api-key.KEY` next to `realtime` — what
the OpenAI SDK and browser clients send. Keys are compared in constant time. The server must never echo the key
subprotocol back; `select_subprotocol` picks the one to accept.

Origin: a browser always sends `Origin` on websocket handshakes and cross-site POSTs; other clients (SDKs, curl)
send none and are allowed (the API key is their gate). A browser page is allowed when
1. its origin is in the allow-list (`--allow-origin URL`, exact scheme://host[:port]; `*` allows every origin);
2. the server binds a loopback address and the page is served from a loopback host (any port): the local
   developer's own pages;
3. the page is same-origin (its host:port equals the request's Host header) *and* its host cannot be rebound by
   an attacker: an IP literal, a loopback name, or exactly the host name the server binds. A same-origin check
   alone is not enough: with DNS rebinding, `http://evil.example:8000` can resolve to 127.0.0.1 or a LAN address,
   and then Origin and Host agree. Pages reached through another DNS name need `--allow-origin`.
`Origin: null` (sandboxed frames, file:// pages) is refused unless "null" is in the allow-list.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Iterable, Mapping
from urllib.parse import urlsplit

KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _header(headers: Mapping[str, str] | Iterable[tuple[str, str]] | None, name: str) -> str | None:
    """Case-insensitive header lookup for starlette Headers, plain dicts or (name, value) pairs."""
    if headers is None:
        return None
    items = headers.items() if hasattr(headers, "items") else headers
    for k, v in items:
        k = k.decode("latin-1") if isinstance(k, bytes) else k
        if k.lower() == name:
            return v.decode("latin-1") if isinstance(v, bytes) else v
    return None


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def check_api_key(headers, subprotocols: Iterable[str] | None, key: str | None) -> bool:
    """True when `key` is None (open server) or the request presents it (Bearer header or key subprotocol)."""
    if key is None:
        return True
    candidates = []
    auth = _header(headers, "authorization")
    if auth:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer":
            candidates.append(token.strip())
    for proto in subprotocols or ():
        proto = proto.strip()
        if proto.startswith(KEY_SUBPROTOCOL_PREFIX):
            candidates.append(proto[len(KEY_SUBPROTOCOL_PREFIX):])
    ok = False
    for c in candidates:  # every candidate is compared, so timing does not depend on which one matched
        ok |= _same(c, key)
    return ok


def select_subprotocol(subprotocols: Iterable[str] | None, preferred: str = "realtime") -> str | None:
    """The subprotocol to accept: `preferred` when offered, never the API-key one; None when nothing else fits."""
    offered = [p.strip() for p in subprotocols or () if not p.strip().startswith(KEY_SUBPROTOCOL_PREFIX)]
    if preferred in offered:
        return preferred
    return None


def is_loopback(host: str | None) -> bool:
    """A loopback name or address (localhost, 127.0.0.0/8, ::1); brackets and zone ids tolerated."""
    if not host:
        return False
    h = host.strip().strip("[]").lower().rstrip(".")
    if h in _LOOPBACK_NAMES or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h.split("%")[0]).is_loopback
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]").split("%")[0])
        return True
    except ValueError:
        return False


def _parse_origin(origin: str) -> tuple[str, str, int] | None:
    """'https://Example.com' -> ('https', 'example.com', 443); None when it is not a scheme://host[:port]."""
    try:
        u = urlsplit(origin.strip())
        port = u.port
    except ValueError:
        return None
    if u.scheme.lower() not in _DEFAULT_PORTS or not u.hostname or u.path not in ("", "/") or u.query:
        return None
    scheme = u.scheme.lower()
    return scheme, u.hostname.lower().rstrip("."), port if port is not None else _DEFAULT_PORTS[scheme]


def _parse_host_header(value: str, scheme: str) -> tuple[str, int] | None:
    try:
        u = urlsplit(f"//{value.strip()}")
        port = u.port
    except ValueError:
        return None
    if not u.hostname:
        return None
    return u.hostname.lower().rstrip("."), port if port is not None else _DEFAULT_PORTS[scheme]


def origin_allowed(origin: str | None, allow_list: Iterable[str] | None, host: str | None, *,
                   request_host: str | None = None) -> bool:
    """May a browser page at `origin` use this server?

    host: the address the server binds (e.g. "127.0.0.1", "0.0.0.0"); request_host: the request's Host header,
    for the same-origin rule (omit it and only the allow-list and the loopback rule apply). See the module doc.
    """
    if origin is None or origin == "":
        return True                     # not a browser
    allow = [a.strip() for a in allow_list or () if a and a.strip()]
    if "*" in allow:
        return True
    if origin.strip() == "null":
        return "null" in allow
    parsed = _parse_origin(origin)
    if parsed is None:
        return False
    if any(_parse_origin(a) == parsed for a in allow if a != "null"):
        return True
    scheme, hostname, port = parsed
    if is_loopback(host) and is_loopback(hostname):
        return True
    if request_host:
        got = _parse_host_header(request_host, "https" if scheme in ("https", "wss") else "http")
        bind = (host or "").strip().strip("[]").lower().rstrip(".")
        if got == (hostname, port) and (_is_ip(hostname) or is_loopback(hostname) or hostname == bind):
            return True
    return False
