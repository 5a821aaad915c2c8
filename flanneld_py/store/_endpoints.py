"""etcd endpoints, shared by the v3 and the v2 store: one parsing rule, one "unreachable" text."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from flanneld_py.store._base import StoreUnavailable

__all__ = ["HINT_DOWN", "HINT_TLS", "Endpoint", "parse_endpoint", "unavailable"]

HINT_DOWN = "check --etcd-endpoints and that etcd is running"
HINT_TLS = "check --etcd-cafile, --etcd-certfile and --etcd-keyfile"


@dataclass(frozen=True)
class Endpoint:
    """One ``--etcd-endpoints`` entry: ``url`` as given, where it points, whether TLS is used."""

    url: str
    host: str
    port: int
    tls: bool

    @property
    def target(self) -> str:
        """``host:port`` (``[v6]:port``), as gRPC takes it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def plain_http_hint(self) -> str:
        """What to change when this TLS endpoint turns out to be a plain http etcd."""
        if self.url.startswith("https://"):
            return "is it a plain http endpoint? use http://"
        # TLS on an http:// URL because client certificates are given (as flannel)
        return (
            "TLS is used because --etcd-certfile and --etcd-keyfile are given; "
            "for a plain http etcd leave them out"
        )

    @property
    def base(self) -> str:
        """``scheme://host:port`` the HTTP requests go to (https when TLS is used)."""
        return f"{'https' if self.tls else 'http'}://{self.target}"


def parse_endpoint(url: str, tls: bool) -> Endpoint:
    """``http(s)://HOST:PORT`` (a bare ``HOST:PORT`` is http; port default 2379); TLS for https
    and whenever ``tls``. Raises ValueError with a one-line message."""
    raw = url.strip()
    parts = urlsplit(raw if "://" in raw else "http://" + raw)
    bad = f"invalid etcd endpoint {url!r}: expected http://HOST:PORT or https://HOST:PORT"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(bad)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(bad)
    try:
        port = parts.port or 2379
    except ValueError:
        raise ValueError(bad) from None
    return Endpoint(raw, parts.hostname, port, tls or parts.scheme == "https")


def unavailable(failures: dict[str, str]) -> StoreUnavailable:
    """No endpoint answered: one line naming each endpoint and why (``{url: why}``)."""
    if len(failures) == 1:
        ((url, why),) = failures.items()
        return StoreUnavailable(f"etcd unreachable at {url}: {why}; {HINT_DOWN}")
    listed = ", ".join(f"{url} ({why})" for url, why in failures.items())
    return StoreUnavailable(f"etcd unreachable at {listed}; {HINT_DOWN}")
