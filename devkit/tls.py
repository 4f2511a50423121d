"""Certificates for the local broker's SASL_SSL listener, made with ``openssl``.

* :func:`make_ca`: a certificate authority (EC P-256 key, self-signed, ten years);
* :func:`make_server_cert`: a broker certificate signed by it, valid for ``127.0.0.1`` and
  ``localhost`` (subjectAltName), and the PKCS12 keystore the broker reads (key, certificate and
  the CA's certificate, protected by a password).

Test equipment only: the CA's key stays next to its certificate, in the broker's state directory.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from devkit.errors import DevkitError


class TlsError(DevkitError):
    pass


@dataclass(frozen=True)
class Authority:
    cert: Path  # PEM: what a client trusts (KAFKA_SSL_CA_FILE)
    key: Path


@dataclass(frozen=True)
class ServerCert:
    cert: Path  # PEM
    key: Path  # PEM, unencrypted
    keystore: Path  # PKCS12: key, certificate, CA certificate
    keystore_password: str


def _openssl(*args: str, cwd: Path, env: dict[str, str] | None = None) -> None:
    if shutil.which("openssl") is None:
        raise TlsError("openssl is not installed; it makes the certificates of the local broker's TLS listener")
    result = subprocess.run(
        ["openssl", *args],
        cwd=cwd,
        env={**os.environ, **env} if env else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if result.returncode != 0:
        raise TlsError(f"openssl {args[0]} failed (exit {result.returncode}): {result.stdout.strip()[-1000:]}")


def _san(host: str) -> str:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return f"DNS:{host}"
    return f"IP:{host}"


def make_ca(directory: Path, name: str = "ca", subject: str = "ctk-pipeline local CA") -> Authority:
    """A self-signed CA in ``directory`` (``{name}.pem``, ``{name}.key``); kept when it exists."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = Authority(directory / f"{name}.pem", directory / f"{name}.key")
    if ca.cert.exists() and ca.key.exists():
        return ca
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        ca.key.name,
        "-out",
        ca.cert.name,
        "-days",
        "3650",
        "-subj",
        f"/CN={subject}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )
    ca.key.chmod(0o600)
    return ca


def make_server_cert(
    directory: Path,
    ca: Authority,
    keystore_password: str,
    name: str = "broker",
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
) -> ServerCert:
    """A server certificate signed by ``ca`` for ``hosts`` (IP addresses and DNS names in its
    subjectAltName) and its PKCS12 keystore; kept when they exist."""
    directory.mkdir(parents=True, exist_ok=True)
    out = ServerCert(directory / f"{name}.pem", directory / f"{name}.key", directory / f"{name}.p12", keystore_password)
    if out.cert.exists() and out.key.exists() and out.keystore.exists():
        return out
    san = ",".join(_san(h) for h in hosts)
    ext = directory / f"{name}.ext"
    ext.write_text(
        f"subjectAltName={san}\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    csr = directory / f"{name}.csr"
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        out.key.name,
        "-out",
        csr.name,
        "-subj",
        f"/CN={hosts[0]}",
        cwd=directory,
    )
    out.key.chmod(0o600)
    _openssl(
        "x509",
        "-req",
        "-in",
        csr.name,
        "-CA",
        str(ca.cert),
        "-CAkey",
        str(ca.key),
        "-CAcreateserial",
        "-out",
        out.cert.name,
        "-days",
        "825",
        "-extfile",
        ext.name,
        cwd=directory,
    )
    _openssl(
        "pkcs12",
        "-export",
        "-in",
        out.cert.name,
        "-inkey",
        out.key.name,
        "-certfile",
        str(ca.cert),
        "-name",
        name,
        "-out",
        out.keystore.name,
        "-passout",
        "env:KEYSTORE_PASSWORD",  # not on the command line, where any process could read it
        cwd=directory,
        env={"KEYSTORE_PASSWORD": keystore_password},
    )
    out.keystore.chmod(0o600)
    csr.unlink(missing_ok=True)
    ext.unlink(missing_ok=True)
    return out
