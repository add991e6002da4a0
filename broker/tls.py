"""TLS for broker's outbound calls (providers, and any other HTTP client sharing the setting).

Certificates are always verified: there is deliberately no setting that turns verification
off. ``ca_bundle`` adds a PEM file of CA certificates (a private CA in front of an internal
provider) to the system's trust store; it is loaded once at start-up, so a missing or
unreadable bundle stops start-up naming the setting instead of failing every call later.
Plain ``http`` is a matter of the URL checks (``allow_insecure_http``, loopback), not of TLS.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp

from broker.errors import ConfigError, ProviderUnavailable


def client_context(ca_bundle: str | None = None) -> ssl.SSLContext:
    """A verifying client context: the system's CAs plus ``ca_bundle``'s (hostname checked,
    TLS 1.2 or later). Raises OSError or ssl.SSLError for a bundle that does not load."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_bundle is not None:
        context.load_verify_locations(cafile=ca_bundle)
    return context


def checked_ca_bundle(setting: str, value: str | None, base_dir: Path) -> str | None:
    """``value`` as an absolute path (relative paths are relative to the config file) once it
    loads as a bundle of PEM CA certificates; ConfigError naming ``setting`` otherwise."""
    if value is None:
        return None
    path = (base_dir / value).resolve()
    try:
        client_context(str(path))
    except ssl.SSLError as err:  # before OSError, its base class
        raise ConfigError(
            setting, f"{path} holds no usable PEM CA certificate ({err.reason or err})"
        ) from err
    except OSError as err:
        raise ConfigError(setting, f"cannot read {path}: {err.strerror}") from err
    return str(path)


def transport_failure(err: aiohttp.ClientError) -> ProviderUnavailable:
    """A failed call as a transient provider failure: ``tls_error`` for a certificate the
    trust store does not accept (or another TLS failure), ``connection_error`` otherwise."""
    if isinstance(err, aiohttp.ClientSSLError):
        return ProviderUnavailable("tls_error", type(err).__name__)
    return ProviderUnavailable("connection_error", type(err).__name__)
