"""Which URLs Homeskillet may send a request to: `check_url`, pure, with no DNS.

A base URL that Homeskillet posts prompts to comes from somewhere it does not fully control (a
hosted·ai panel's answer, a catalog file). Before it is used it must be an http(s) URL with a host,
no credentials in it, and nothing after the path: a `?` or `#` would swallow the path that the
caller appends (`{base}/chat/completions`), sending the request to the URL's own choice of path.
Its host must not be a loopback, private, unspecified or shared address unless the caller allows
private ones (a model server on loopback, a local panel), and never a link-local address: that is
where cloud metadata services answer (169.254.169.254, fe80::/10), and nothing Homeskillet calls
lives there. Hostnames are not resolved (validation must not depend on, or wait for, DNS): a name
that is an address in another spelling (`2130706433`, `0x7f.1`, `127.1`, `::ffff:127.0.0.1`) is
judged as that address, and `localhost` and `*.localhost` count as loopback.

Errors name `what` is being checked and the problem, and show the host only: a URL's path or
userinfo may hold a secret.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

SCHEMES = ("http", "https")
# names that always mean a cloud's metadata service, wherever they resolve
METADATA_NAMES = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data"})
METADATA_ADDRESSES = frozenset({ipaddress.ip_address("fd00:ec2::254")})  # AWS's IPv6 metadata address

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def check_url(url: str, *, what: str, allow_private: bool) -> str:
    """`url` as a normalised base URL (scheme and host in lower case, no trailing slash), or
    ValueError naming `what` and the problem."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"{what}: no URL given")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 or ch == "\\" for ch in url):
        raise ValueError(f"{what}: the URL holds whitespace, a control character or a backslash")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"{what}: not a URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"{what}: scheme {scheme or '(none)'!r} refused; only http and https")
    if "@" in parts.netloc:
        raise ValueError(f"{what}: credentials in the URL (user:password@) refused")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise ValueError(f"{what}: the URL has no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{what}: host {host}: the port is not a number from 0 to 65535") from None
    if "?" in url:
        raise ValueError(f"{what}: host {host}: a query (?…) is refused in a base URL")
    if "#" in url:
        raise ValueError(f"{what}: host {host}: a fragment (#…) is refused in a base URL")
    problem = host_problem(host, allow_private=allow_private)
    if problem:
        raise ValueError(f"{what}: host {host}: {problem}")
    shown = f"[{host}]" if ":" in host else host
    netloc = shown if port is None else f"{shown}:{port}"
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"


def host_problem(host: str, *, allow_private: bool) -> str | None:
    """Why a host (a name or an address, no brackets) is refused, or None."""
    name = host.lower().rstrip(".")
    if name in METADATA_NAMES:
        return "a cloud metadata service's name is always refused"
    address = as_address(name)
    if address is None:
        if name == "localhost" or name.endswith(".localhost"):
            return None if allow_private else "loopback (localhost) refused"
        return None
    if address.is_link_local or address in METADATA_ADDRESSES:
        return "a link-local address (where cloud metadata services answer) is always refused"
    if address.is_multicast:
        return "a multicast address is always refused"
    if allow_private:
        return None
    if address.is_loopback:
        return "a loopback address is refused"
    if address.is_unspecified:
        return "the unspecified address is refused"
    if address.is_private or not address.is_global:
        return "a private or non-public address is refused"
    return None


def is_private_host(host: str) -> bool:
    """Whether a host is loopback, private or otherwise not public (as `check_url` without
    allow_private would refuse it for that reason)."""
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    address = as_address(name)
    return address is not None and not address.is_global


NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def as_address(host: str) -> Address | None:
    """The IP address a host denotes in any spelling the OS resolver accepts without DNS
    (dotted quad, shortened or numeric IPv4, IPv6, and IPv6 that carries an IPv4: mapped, 6to4,
    NAT64), or None for a name."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        try:  # inet_aton takes 127.1, 0x7f.0.0.1, 2130706433: what the resolver would
            address = ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped or address.sixtofour
        if mapped is None and address in NAT64:  # the well-known NAT64 prefix reaches the IPv4 inside
            mapped = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if mapped is not None:
            return mapped
    return address
