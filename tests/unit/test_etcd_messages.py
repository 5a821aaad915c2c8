"""What the etcd store says about connection failures, from the details grpc really reports.

Every ``details`` string below was observed with grpcio 1.85 / etcd 3.4 (a ``Maintenance.Status``
call over ``grpc.aio``, the options of ``flanneld_py.store.etcd``):

- closed port: 127.0.0.1 and, inside a fresh network namespace, ``[::1]``;
- a namespace with only ``lo`` up, connecting to 10.255.255.1 / 2001:db8::1 (no route at all);
- a veth in that namespace with 10.66.0.1/24, connecting to 10.66.0.2 (nobody answers ARP), and
  iptables ``REJECT`` rules in its OUTPUT chain (icmp-host-unreachable, icmp-net-unreachable,
  tcp-reset);
- iptables ``DROP`` of SYNs to 127.0.0.1:2379 inside the namespace: with a 5 s deadline the call
  hits it; with 40 s grpc's own 20 s connect timeout fires first;
- a listener on 127.0.0.1 that resets (SO_LINGER 0) at accept or after the first read;
- https to a plain-http etcd, http to a TLS etcd, TLS etcd without / with a foreign client
  certificate, a foreign CA, unusable TLS files (swapped, mismatched, garbage CA);
- a listener answering ``HTTP/1.1 400`` (http and https) and a TLS 1.1-only TLS server.

The texts are asserted word for word: no grpc status words, addresses or syscall names.
"""

from __future__ import annotations

import grpc  # type: ignore[import-untyped,unused-ignore]
import pytest

from flanneld_py.store._endpoints import unavailable
from flanneld_py.store.etcd import EtcdSettings, EtcdStore, _classify, _parse_endpoint

LAST = "failed to connect to all addresses; last error: "
HTTPS = "https://127.0.0.1:2379"
HTTP = "http://127.0.0.1:2379"
#: TLS on an http:// URL: client certificates given (flannel's rule)
HTTP_CERT = "http+cert"

TLS_HINT = "check --etcd-cafile, --etcd-certfile and --etcd-keyfile"

U = grpc.StatusCode.UNAVAILABLE

CASES = [
    # -- the member is out of reach: "connect" (StoreUnavailable, retried) ---------------------
    pytest.param(
        U, LAST + "UNKNOWN: ipv4:127.0.0.1:58103: Failed to connect to remote host: "
        "Connection refused", HTTP, "connect", "connection refused", id="closed-port",
    ),
    pytest.param(
        U, LAST + "UNKNOWN: ipv6:%5B::1%5D:2379: Failed to connect to remote host: "
        "Connection refused", HTTP, "connect", "connection refused", id="closed-port-ipv6",
    ),
    pytest.param(
        U, LAST + "UNKNOWN: ipv4:10.66.0.5:2379: Failed to connect to remote host: "
        "Connection refused", HTTP, "connect", "connection refused", id="reject-tcp-reset",
    ),
    pytest.param(
        U, LAST + "FAILED_PRECONDITION: ipv4:10.255.255.1:2379: connect failed: addr: "
        "ipv4:10.255.255.1:2379 error: Network is unreachable", HTTP, "connect",
        "network is unreachable", id="netns-no-route",
    ),
    pytest.param(
        U, LAST + "FAILED_PRECONDITION: ipv6:%5B2001:db8::1%5D:2379: connect failed: addr: "
        "ipv6:%5B2001:db8::1%5D:2379 error: Network is unreachable", HTTP, "connect",
        "network is unreachable", id="netns-no-route-ipv6",
    ),
    pytest.param(
        U, LAST + "UNKNOWN: ipv4:10.66.0.4:2379: Failed to connect to remote host: "
        "getsockopt(SO_ERROR): Network is unreachable", HTTP, "connect",
        "network is unreachable", id="reject-icmp-net-unreachable",
    ),
    pytest.param(
        U, LAST + "UNKNOWN: ipv4:10.66.0.2:2379: Failed to connect to remote host: "
        "getsockopt(SO_ERROR): No route to host", HTTP, "connect", "no route to host",
        id="arp-unanswered",
    ),
    pytest.param(
        U, LAST + "UNKNOWN: ipv4:10.66.0.3:2379: Failed to connect to remote host: "
        "getsockopt(SO_ERROR): No route to host", HTTPS, "connect", "no route to host",
        id="reject-icmp-host-unreachable",
    ),
    pytest.param(
        U, LAST + "UNKNOWN: ipv4:127.0.0.1:2379: Failed to connect to remote host: "
        "connect() timed out", HTTP, "connect", "connection timed out", id="drop-grpc-timeout",
    ),
    pytest.param(
        grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", HTTP, "connect",
        "no answer within 5s", id="drop-call-deadline",
    ),
    pytest.param(
        U, LAST + "UNKNOWN: ipv4:127.0.0.1:58037: Failed to connect to remote host: "
        "getsockopt(SO_ERROR): Connection reset by peer", HTTP, "connect", "connection reset",
        id="reset-at-accept",
    ),
    pytest.param(
        U, LAST + "UNAVAILABLE: ipv4:127.0.0.1:46487: recvmsg:Connection reset by peer (104)",
        HTTP, "connect", "connection reset", id="reset-after-read",
    ),
    pytest.param(
        U, LAST + "UNAVAILABLE: ipv4:127.0.0.1:46487: Handshake read failed "
        "(recvmsg:Connection reset by peer (104))", HTTPS, "connect",
        "connection reset during the TLS handshake (is it a plain http endpoint? use http://)",
        id="reset-during-tls-handshake",
    ),
    pytest.param(
        U, LAST + "UNAVAILABLE: ipv4:127.0.0.1:45171: Socket closed", HTTP, "connect",
        "connection closed by the server (a TLS-only etcd? then use https://)",
        id="http-to-tls-etcd",
    ),
    pytest.param(
        U, LAST + "INTERNAL: ipv4:127.0.0.1:47551: Failed parsing HTTP/2 (Expected SETTINGS "
        "frame as the first frame, got frame type 80) (Trying to connect an http1.x server "
        "(HTTP status 400))", HTTP, "connect",
        "the server answered HTTP/1.x, not gRPC (is it etcd's client URL, port 2379?)",
        id="http1-server",
    ),
    pytest.param(
        U, "Stream removed (Socket closed)", HTTP, "connect", "connection lost",
        id="stream-removed",
    ),
    # -- TLS: "config" (StoreError once no member is left) -------------------------------------
    pytest.param(
        U, LAST + "UNAVAILABLE: ipv4:127.0.0.1:39415: Handshake read failed (Socket closed)",
        HTTPS, "config", "TLS handshake with etcd at https://127.0.0.1:2379 failed: the server "
        "closed the connection; is it a plain http endpoint? use http://",
        id="https-to-plain-etcd",
    ),
    pytest.param(
        U, LAST + "UNAVAILABLE: ipv4:127.0.0.1:39415: Handshake read failed (Socket closed)",
        HTTP_CERT, "config", "TLS handshake with etcd at http://127.0.0.1:2379 failed: the "
        "server closed the connection; TLS is used because --etcd-certfile and --etcd-keyfile "
        "are given; for a plain http etcd leave them out", id="client-cert-to-plain-etcd",
    ),
    pytest.param(
        U, LAST + "UNKNOWN: ipv4:127.0.0.1:47551: Tls handshake failed (TSI_PROTOCOL_FAILURE): "
        "SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER: "
        "Invalid certificate verification context: OK", HTTPS, "config",
        "TLS handshake with etcd at https://127.0.0.1:2379 failed: the server answered without "
        "TLS; is it a plain http endpoint? use http://", id="https-to-http1-server",
    ),
    pytest.param(
        U, LAST + "UNKNOWN: ipv4:127.0.0.1:36099: Tls handshake failed (TSI_PROTOCOL_FAILURE): "
        "SSL_ERROR_SSL: error:1000042e:SSL routines:OPENSSL_internal:"
        "TLSV1_ALERT_PROTOCOL_VERSION: Invalid certificate verification context: OK", HTTPS,
        "config", "TLS handshake with etcd at https://127.0.0.1:2379 failed (tlsv1 alert "
        f"protocol version); {TLS_HINT}", id="tls1.1-only-server",
    ),
    pytest.param(
        U, LAST + "UNKNOWN: ipv4:127.0.0.1:45171: Tls handshake failed (TSI_PROTOCOL_FAILURE): "
        "SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: "
        "unable to get local issuer certificate: OK", HTTPS, "config",
        "TLS: cannot verify the certificate of etcd at https://127.0.0.1:2379 (unable to get "
        f"local issuer certificate); {TLS_HINT}", id="foreign-ca",
    ),
    pytest.param(
        U, LAST + "UNAVAILABLE: ipv4:127.0.0.1:45171: Unwrap failed (TSI_DATA_CORRUPTED)", HTTPS,
        "config", "TLS: etcd at https://127.0.0.1:2379 rejected our client certificate (or none "
        f"was given); {TLS_HINT}", id="no-or-foreign-client-cert",
    ),
    pytest.param(
        U, LAST + "UNKNOWN: ipv4:127.0.0.1:45171: Failed to create security handshaker.", HTTPS,
        "config", "TLS: cannot set up TLS for etcd at https://127.0.0.1:2379 (grpc could not "
        f"create the TLS handshaker from the certificates and key given); {TLS_HINT}",
        id="unusable-tls-files",
    ),
    # -- no details at all ------------------------------------------------------------------
    pytest.param(grpc.StatusCode.UNKNOWN, "", HTTP, "connect", "connection failed", id="empty"),
    pytest.param(
        grpc.StatusCode.INTERNAL, "Internal error from Core", HTTP, "connect",
        "connection failed (Internal error from Core)", id="internal",
    ),
]  # fmt: skip


def endpoint(url: str) -> object:
    if url == HTTP_CERT:
        return _parse_endpoint(HTTP, tls=True)
    return _parse_endpoint(url, tls=False)


@pytest.mark.parametrize(("code", "details", "url", "kind", "text"), CASES)
def test_classified_text(code: object, details: str, url: str, kind: str, text: str) -> None:
    f = _classify(code, details, endpoint(url), 5.0)  # type: ignore[arg-type]
    assert (f.kind, f.text) == (kind, text)


def test_grpc_internals_never_show() -> None:
    for p in CASES:
        code, details, url, _, _ = p.values
        text = _classify(code, details, endpoint(url), 5.0).text  # type: ignore[arg-type]
        for internal in ("last error", "ipv4:", "ipv6:", "%5B", "UNKNOWN", "UNAVAILABLE",
                         "FAILED_PRECONDITION", "getsockopt", "SO_ERROR", "recvmsg",
                         "Failed to connect to remote host", "(104)"):  # fmt: skip
            assert internal not in text, (p.id, text)


def test_plain_http_hint_only_when_the_server_did_not_speak_tls() -> None:
    for p in CASES:
        _, details, url, _, text = p.values
        plausible = url == HTTPS and (
            "WRONG_VERSION_NUMBER" in details
            or "Handshake read failed (Socket closed)" in details
            or "Handshake read failed (recvmsg:Connection reset" in details
        )
        assert ("use http://" in text) == plausible, (p.id, text)


def test_the_whole_message_of_an_unreachable_member() -> None:
    """What the caller sees (StoreUnavailable): one line, the endpoint, the cause, the hint."""
    store = EtcdStore(EtcdSettings(["http://10.66.0.2:2379", "http://10.255.255.1:2379"]))
    arp = LAST + (
        "UNKNOWN: ipv4:10.66.0.2:2379: Failed to connect to remote host: getsockopt(SO_ERROR): "
        "No route to host"
    )
    ep0, ep1 = (_parse_endpoint(u, tls=False) for u in store.endpoints)
    one = unavailable({ep0.url: _classify(U, arp, ep0, 5.0).text})
    assert str(one) == (
        "etcd unreachable at http://10.66.0.2:2379: no route to host; check --etcd-endpoints "
        "and that etcd is running"
    )
    dropped = LAST + (
        "UNKNOWN: ipv4:10.255.255.1:2379: Failed to connect to remote host: connect() timed out"
    )
    both = unavailable(
        {
            ep0.url: _classify(U, arp, ep0, 5.0).text,
            ep1.url: _classify(U, dropped, ep1, 5.0).text,
        }
    )
    assert str(both) == (
        "etcd unreachable at http://10.66.0.2:2379 (no route to host), http://10.255.255.1:2379 "
        "(connection timed out); check --etcd-endpoints and that etcd is running"
    )
