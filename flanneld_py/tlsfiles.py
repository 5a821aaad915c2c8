"""Check the etcd TLS files (``--etcd-cafile``, ``--etcd-certfile``, ``--etcd-keyfile``) up front.

gRPC only notices unusable TLS files when it connects, and then says no more than "Failed to
create security handshaker". ``check_tls_files`` loads them the way the TLS client will (with the
stdlib ``ssl`` module): the CA file must hold PEM certificates, the certificate file a PEM
certificate, the key file an unencrypted PEM private key that belongs to that certificate. Any
problem raises ``TlsFileError`` with one line naming the flag, the file and the cause, e.g.
``--etcd-keyfile k.pem: not a PEM private key (it holds a certificate)``.

Pure apart from reading the files: no network, no global state.
"""

from __future__ import annotations

import os
import re
import ssl

__all__ = ["TlsFileError", "check_tls_files"]

CA, CERT, KEY = "--etcd-cafile", "--etcd-certfile", "--etcd-keyfile"

_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_CERT_LABELS = frozenset({b"CERTIFICATE", b"X509 CERTIFICATE", b"TRUSTED CERTIFICATE"})
#: OpenSSL's reasons for a private key that does not belong to the certificate (the second one
#: when the key types differ, e.g. an RSA key for an EC certificate)
_MISMATCH = frozenset({"KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED", "KEY_TYPE_MISMATCH"})


class TlsFileError(ValueError):
    """A TLS file is unusable; ``str(e)`` is one line: flag, file, cause."""


class _NeedsPassword(Exception):
    pass


def _no_password() -> bytes:
    # called by OpenSSL only for an encrypted key; raising keeps it from prompting on the tty
    raise _NeedsPassword


class _Pem:
    """What a file holds, by its PEM block labels."""

    def __init__(self, flag: str, path: str) -> None:
        self.flag = flag
        self.path = path
        try:
            with open(path, "rb") as f:
                self.data = f.read()
        except OSError as e:
            raise TlsFileError(f"cannot read {flag} {path}: {e.strerror}") from None
        self.labels = set(_BEGIN.findall(self.data))

    @property
    def has_cert(self) -> bool:
        return bool(self.labels & _CERT_LABELS)

    @property
    def has_key(self) -> bool:
        return any(label.endswith(b"PRIVATE KEY") for label in self.labels)

    @property
    def encrypted(self) -> bool:
        return b"ENCRYPTED PRIVATE KEY" in self.labels or b"Proc-Type: 4,ENCRYPTED" in self.data

    def content(self) -> str:
        """Why this file is not what its flag wants ("" if nothing more precise is known)."""
        if not self.data.strip():
            return "the file is empty"
        if b"-----BEGIN" not in self.data and self.data[:1] == b"\x30":
            return "it is binary DER, not PEM text"
        if self.has_key and self.flag != KEY:
            return "it holds a private key"
        if self.has_cert and self.flag == KEY:
            return "it holds a certificate"
        if b"CERTIFICATE REQUEST" in self.labels or b"NEW CERTIFICATE REQUEST" in self.labels:
            return "it holds a certificate signing request, not the signed certificate"
        if b"PUBLIC KEY" in self.labels:
            return "it holds a public key"
        return ""

    def error(self, what: str, extra: str = "") -> TlsFileError:
        why = "; ".join(x for x in (self.content(), extra) if x)
        return TlsFileError(f"{self.flag} {self.path}: {what}" + (f" ({why})" if why else ""))


def _parse_certificates(pem: _Pem, what: str) -> None:
    """Let OpenSSL parse every certificate of the file (a damaged block fails here)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cafile=pem.path)
    except ssl.SSLError:
        raise pem.error(what, "a certificate in it does not parse") from None
    except OSError as e:
        raise TlsFileError(f"cannot read {pem.flag} {pem.path}: {e.strerror}") from None


def check_tls_files(
    cafile: str | None = None, certfile: str | None = None, keyfile: str | None = None
) -> None:
    """Raise ``TlsFileError`` unless every file given is usable; ``certfile`` and ``keyfile`` are
    checked as a pair (both or neither; the caller checks that they come together)."""
    if cafile:
        ca = _Pem(CA, cafile)
        if not ca.has_cert:
            raise ca.error("not a PEM certificate bundle")
        _parse_certificates(ca, "not a PEM certificate bundle")
    if not (certfile and keyfile):
        return
    cert, key = _Pem(CERT, certfile), _Pem(KEY, keyfile)
    if not cert.has_cert and cert.has_key and key.has_cert and not key.has_key:
        raise TlsFileError(
            f"{CERT}/{KEY} are swapped: {CERT} {certfile} holds a private key and {KEY} "
            f"{keyfile} a certificate ({CERT} takes the certificate, {KEY} the key)"
        )
    roles = f"{CERT} takes the certificate, {KEY} the key"
    if not cert.has_cert:
        raise cert.error("not a PEM certificate", roles if cert.has_key else "")
    _parse_certificates(cert, "not a PEM certificate")
    if not key.has_key:
        raise key.error("not a PEM private key", roles if key.has_cert else "")
    base, ext = os.path.splitext(keyfile)
    encrypted = TlsFileError(
        f"{KEY} {keyfile}: the private key is encrypted (it needs a password, which the etcd "
        f"client cannot take); write an unencrypted copy with: openssl pkey -in {keyfile} "
        f"-out {base}-decrypted{ext or '.pem'}"
    )
    if key.encrypted:
        raise encrypted
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_cert_chain(certfile, keyfile, password=_no_password)
    except _NeedsPassword:
        raise encrypted from None
    except ssl.SSLError as e:
        if getattr(e, "reason", None) in _MISMATCH:
            raise TlsFileError(
                f"{CERT}/{KEY}: the key does not match the certificate ({keyfile} is not the "
                f"private key of {certfile})"
            ) from None
        raise key.error("not a PEM private key", "it does not parse") from None
    except OSError as e:
        raise TlsFileError(f"cannot read {CERT}/{KEY}: {e.strerror}") from None
