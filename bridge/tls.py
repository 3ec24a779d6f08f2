"""TLS client contexts: verified server, optional client certificate, ALPN, SNI.

There is no way to turn verification off and no plaintext fallback: an mqtts:// URL
always verifies the server's chain and host name.
"""

from __future__ import annotations

import ssl
from pathlib import Path


def client_context(
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    alpn: list[str],
) -> ssl.SSLContext:
    """Build the context; raises ValueError naming the file and the problem."""
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"ca_file {ca_file}: not a readable PEM CA bundle ({_why(exc)})") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        try:
            context.load_cert_chain(
                str(cert_file), str(key_file) if key_file else None, password=_no_passphrase
            )
        except _Encrypted:
            key = key_file or cert_file
            raise ValueError(
                f"key_file {key}: the private key is encrypted; the bridge reads keys "
                f"without a passphrase (decrypt it: openssl pkey -in {key} -out NEW_FILE)"
            ) from None
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(
                f"cert_file {cert_file} / key_file {key_file}: cannot load the client "
                f"certificate ({_why(exc)})"
            ) from None
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


class _Encrypted(Exception):
    pass


def _no_passphrase() -> str:
    # Called only for an encrypted key. Without a callback OpenSSL would prompt on the
    # terminal and block the start; a worker has nobody to type a passphrase.
    raise _Encrypted


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)
