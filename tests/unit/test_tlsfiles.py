"""flanneld_py.tlsfiles: real keys and certificates made with the openssl command line; every
message is checked word for word."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from flanneld_py import tlsfiles
from flanneld_py.tlsfiles import TlsFileError, check_tls_files

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def openssl(d: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Files:
    d: Path
    ca: str  # CA certificate
    cert: str  # client certificate signed by the CA (EC key)
    key: str
    other_key: str  # an EC key of another pair
    rsa_cert: str  # a self-signed RSA certificate
    rsa_key: str
    enc_key: str  # ``key``, PKCS#8-encrypted
    enc_rsa_key: str  # ``rsa_key``, encrypted the traditional way (Proc-Type: 4,ENCRYPTED)
    cert_and_key: str  # ``cert`` and ``key`` in one file
    der: str  # ``cert`` in DER
    csr: str  # a certificate signing request for ``key``
    pub: str  # the public key of ``key``
    damaged: str  # ``cert`` with one base64 line changed
    empty: str
    garbage: str

    def path(self, name: str) -> str:
        return str(self.d / name)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Files:
    d = tmp_path_factory.mktemp("tls")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl(d, "req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=test CA")  # fmt: skip
    openssl(d, "req", *ec, "-keyout", "key.pem", "-out", "client.csr", "-subj", "/CN=client")
    openssl(d, "x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-out", "cert.pem", "-days", "2")  # fmt: skip
    openssl(d, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-out", "other-key.pem")  # fmt: skip
    openssl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rsa-key.pem",
            "-out", "rsa-cert.pem", "-days", "2", "-subj", "/CN=rsa")  # fmt: skip
    openssl(d, "pkey", "-in", "key.pem", "-out", "enc-key.pem", "-aes256", "-passout", "pass:pw")
    openssl(d, "rsa", "-in", "rsa-key.pem", "-out", "enc-rsa-key.pem", "-aes256", "-traditional",
            "-passout", "pass:pw")  # fmt: skip
    openssl(d, "x509", "-in", "cert.pem", "-outform", "der", "-out", "cert.der")
    openssl(d, "req", "-new", "-key", "key.pem", "-subj", "/CN=client", "-out", "csr.pem")
    openssl(d, "pkey", "-in", "key.pem", "-pubout", "-out", "pub.pem")
    (d / "cert-and-key.pem").write_bytes(
        (d / "cert.pem").read_bytes() + (d / "key.pem").read_bytes()
    )
    lines = (d / "cert.pem").read_text().splitlines(keepends=True)
    lines[2] = "A" * (len(lines[2]) - 1) + "\n"
    (d / "damaged.pem").write_text("".join(lines))
    (d / "empty.pem").write_bytes(b"")
    (d / "garbage.pem").write_text("this is not a certificate\n")
    assert "ENCRYPTED" in (d / "enc-rsa-key.pem").read_text().split("\n")[1]
    return Files(
        d=d,
        ca=str(d / "ca.pem"),
        cert=str(d / "cert.pem"),
        key=str(d / "key.pem"),
        other_key=str(d / "other-key.pem"),
        rsa_cert=str(d / "rsa-cert.pem"),
        rsa_key=str(d / "rsa-key.pem"),
        enc_key=str(d / "enc-key.pem"),
        enc_rsa_key=str(d / "enc-rsa-key.pem"),
        cert_and_key=str(d / "cert-and-key.pem"),
        der=str(d / "cert.der"),
        csr=str(d / "csr.pem"),
        pub=str(d / "pub.pem"),
        damaged=str(d / "damaged.pem"),
        empty=str(d / "empty.pem"),
        garbage=str(d / "garbage.pem"),
    )


def error(**files: str | None) -> str:
    with pytest.raises(TlsFileError) as err:
        check_tls_files(**files)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_valid_files_pass(tls: Files) -> None:
    check_tls_files()
    check_tls_files(cafile=tls.ca)
    check_tls_files(tls.ca, tls.cert, tls.key)
    check_tls_files(None, tls.rsa_cert, tls.rsa_key)
    check_tls_files(tls.ca, tls.cert_and_key, tls.key)  # a certificate file with the key in it
    check_tls_files(tls.ca, tls.cert, tls.cert_and_key)  # a key file with the certificate in it
    check_tls_files(cafile=tls.cert_and_key)  # the key block of a CA file is ignored


def test_cert_and_key_swapped(tls: Files) -> None:
    assert error(certfile=tls.key, keyfile=tls.cert) == (
        f"--etcd-certfile/--etcd-keyfile are swapped: --etcd-certfile {tls.key} holds a private "
        f"key and --etcd-keyfile {tls.cert} a certificate (--etcd-certfile takes the "
        "certificate, --etcd-keyfile the key)"
    )


@pytest.mark.parametrize(("cert", "key"), [("cert", "other_key"), ("cert", "rsa_key")])
def test_key_of_another_certificate(tls: Files, cert: str, key: str) -> None:
    # EC key of another pair (KEY_VALUES_MISMATCH) and an RSA key for an EC certificate
    # (OpenSSL says NO_CERTIFICATE_ASSIGNED): both are a mismatch
    c, k = getattr(tls, cert), getattr(tls, key)
    assert error(certfile=c, keyfile=k) == (
        f"--etcd-certfile/--etcd-keyfile: the key does not match the certificate ({k} is not the "
        f"private key of {c})"
    )


def test_the_ca_given_as_client_certificate_is_a_mismatch(tls: Files) -> None:
    assert error(certfile=tls.ca, keyfile=tls.key) == (
        f"--etcd-certfile/--etcd-keyfile: the key does not match the certificate ({tls.key} is "
        f"not the private key of {tls.ca})"
    )


@pytest.mark.parametrize(
    ("name", "cause"),
    [
        ("garbage", ""),
        ("empty", " (the file is empty)"),
        ("key", " (it holds a private key)"),
        ("enc_key", " (it holds a private key)"),
        ("der", " (it is binary DER, not PEM text)"),
        ("damaged", " (a certificate in it does not parse)"),
    ],
)
def test_bad_ca_file(tls: Files, name: str, cause: str) -> None:
    path = getattr(tls, name)
    assert error(cafile=path) == f"--etcd-cafile {path}: not a PEM certificate bundle{cause}"


@pytest.mark.parametrize(
    ("name", "cause"),
    [
        ("garbage", ""),
        ("empty", " (the file is empty)"),
        ("der", " (it is binary DER, not PEM text)"),
        ("csr", " (it holds a certificate signing request, not the signed certificate)"),
        ("damaged", " (a certificate in it does not parse)"),
        (
            "key",
            " (it holds a private key; --etcd-certfile takes the certificate, --etcd-keyfile "
            "the key)",
        ),
    ],
)
def test_bad_certificate_file(tls: Files, name: str, cause: str) -> None:
    path = getattr(tls, name)
    assert error(certfile=path, keyfile=tls.key) == (
        f"--etcd-certfile {path}: not a PEM certificate{cause}"
    )


@pytest.mark.parametrize(
    ("name", "cause"),
    [
        ("garbage", ""),
        ("empty", " (the file is empty)"),
        ("pub", " (it holds a public key)"),
        (
            "cert",
            " (it holds a certificate; --etcd-certfile takes the certificate, --etcd-keyfile "
            "the key)",
        ),
    ],
)
def test_bad_key_file(tls: Files, name: str, cause: str) -> None:
    path = getattr(tls, name)
    assert error(certfile=tls.cert, keyfile=path) == (
        f"--etcd-keyfile {path}: not a PEM private key{cause}"
    )


def test_damaged_key(tls: Files) -> None:
    key = tls.path("damaged-key.pem")
    lines = Path(tls.key).read_text().splitlines(keepends=True)
    Path(key).write_text("".join([lines[0], "QUJD" * 16 + "\n", lines[-1]]))
    assert error(certfile=tls.cert, keyfile=key) == (
        f"--etcd-keyfile {key}: not a PEM private key (it does not parse)"
    )


@pytest.mark.parametrize(("cert", "key"), [("cert", "enc_key"), ("rsa_cert", "enc_rsa_key")])
def test_encrypted_key(tls: Files, cert: str, key: str) -> None:
    c, k = getattr(tls, cert), getattr(tls, key)
    base = k.removesuffix(".pem")
    assert error(certfile=c, keyfile=k) == (
        f"--etcd-keyfile {k}: the private key is encrypted (it needs a password, which the etcd "
        f"client cannot take); write an unencrypted copy with: openssl pkey -in {k} -out "
        f"{base}-decrypted.pem"
    )


def test_openssl_password_request_never_prompts(
    tls: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the PEM-label check, OpenSSL asks for the password: the callback answers that
    request (no prompt on the terminal) with the same message."""
    monkeypatch.setattr(tlsfiles._Pem, "encrypted", property(lambda self: False))
    k = tls.enc_key
    assert error(certfile=tls.cert, keyfile=k) == (
        f"--etcd-keyfile {k}: the private key is encrypted (it needs a password, which the etcd "
        f"client cannot take); write an unencrypted copy with: openssl pkey -in {k} -out "
        f"{k.removesuffix('.pem')}-decrypted.pem"
    )


def test_unreadable_files(tls: Files) -> None:
    missing = tls.path("missing.pem")
    assert (
        error(cafile=missing) == f"cannot read --etcd-cafile {missing}: No such file or directory"
    )
    assert error(certfile=missing, keyfile=tls.key) == (
        f"cannot read --etcd-certfile {missing}: No such file or directory"
    )
    assert error(certfile=tls.cert, keyfile=missing) == (
        f"cannot read --etcd-keyfile {missing}: No such file or directory"
    )


def test_the_ca_file_is_checked_first(tls: Files) -> None:
    assert error(cafile=tls.garbage, certfile=tls.key, keyfile=tls.cert) == (
        f"--etcd-cafile {tls.garbage}: not a PEM certificate bundle"
    )
