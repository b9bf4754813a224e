from __future__ import annotations

import datetime
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from cli_helpers import run_error
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from gateway_helpers import OPULON, free_port


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "4"], "--workers must be 1"),
        (["--ssl-certfile", "cert.pem"], "both --ssl-certfile and --ssl-keyfile"),
        (["--max-body", "lots"], "invalid amount 'lots'"),
        (["--port", "70000"], "less than or equal to 65535"),
        (["--read-timeout", "0"], "--read-timeout"),
        (["--host", "0.0.0.0"], "clear text"),
    ],
)
def test_bad_serve_options_are_one_line(args: list[str], message: str) -> None:
    assert message in run_error("serve", *args)


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_serve_speaks_tls_with_its_own_certificate(tmp_path: Path, isolated_home: Path) -> None:
    cert, key = _self_signed(tmp_path)
    port = free_port()
    process = subprocess.Popen(
        [
            OPULON,
            "serve",
            "--port",
            str(port),
            "--ssl-certfile",
            str(cert),
            "--ssl-keyfile",
            str(key),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        context = ssl.create_default_context(cafile=str(cert))
        deadline = time.monotonic() + 20
        while True:
            try:
                response = httpx.get(f"https://localhost:{port}/healthz", verify=context, timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.1)
        assert response.status_code == 200 and response.json()["status"] == "ok"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert b"with TLS" in output
