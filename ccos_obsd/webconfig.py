"""The HTTP port's web configuration file: Prometheus's exporter-toolkit format (TLS, mTLS, basic auth).

``http.web_config`` names a YAML file in the format node_exporter and every other
exporter built on prometheus/exporter-toolkit read (its docs/web-configuration.md).
ccos-obsd implements ``tls_server_config`` (``cert_file``, ``key_file``,
``client_auth_type``, ``client_ca_file``, ``min_version``, ``max_version``) and
``basic_auth_users``, with the toolkit's names, defaults and checks. A key it
does not implement is refused by name, never ignored: a file written for an
exporter must not quietly protect less here. Relative paths in the file are
relative to the file's directory, as in the toolkit.

The file is read by the daemon only (at start and on every reload, through
``read_web_config``): the socket's clients never need its certificates or users.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import secrets
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import bcrypt
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from ccos_obsd.config import Config
from ccos_obsd.errors import ConfigError

ClientAuthType = Literal["NoClientCert", "VerifyClientCertIfGiven", "RequireAndVerifyClientCert"]

_CLIENT_AUTH: dict[str, ssl.VerifyMode] = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")
"""The toolkit's modes that accept a client certificate without verifying it. Python's ssl module
verifies every certificate it asks for, so these cannot be served as the toolkit does: refused."""

_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}

_TOP_KEYS = {"tls_server_config", "basic_auth_users"}
_TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version"}
_NOT_IMPLEMENTED = {
    "http_server_config", "rate_limit",
    "tls_server_config.cert", "tls_server_config.key", "tls_server_config.client_ca",
    "tls_server_config.cipher_suites", "tls_server_config.curve_preferences",
    "tls_server_config.prefer_server_cipher_suites", "tls_server_config.client_allowed_sans",
}
"""exporter-toolkit keys ccos-obsd refuses by name (inline PEM: use the *_file keys)."""

_BCRYPT_HASH = re.compile(rb"\$2[abxy]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
"""A bcrypt hash in modular crypt format, as ``htpasswd -nB`` writes it (cost 4 to 31)."""
BCRYPT_MAX_PASSWORD = 72
"""bcrypt reads at most 72 bytes of a password; a longer one is refused, not truncated."""


@dataclass(frozen=True)
class TlsServerConfig:
    cert_file: Path
    key_file: Path
    client_auth_type: ClientAuthType
    client_ca_file: Path | None
    min_version: str
    max_version: str
    files_sha256: str
    """Of the certificate, key and client CA files' bytes: a reload that finds them changed
    (a renewed certificate) serves new connections with the new ones."""
    context: ssl.SSLContext = field(compare=False, repr=False)
    """Built from those files at load, once; the connections accepted after a reload use the new one."""


@dataclass(frozen=True)
class WebConfig:
    path: Path
    users: tuple[tuple[str, bytes], ...]
    """``basic_auth_users``: (user, bcrypt hash), sorted. Empty: no basic auth."""
    tls: TlsServerConfig | None

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        return None if self.tls is None else self.tls.context

    @cached_property
    def passwords(self) -> PasswordCheck:
        return PasswordCheck(dict(self.users))


def read_web_config(config: Config) -> Config:
    """``config`` with ``http.web`` read from ``http.web_config`` (none when unset or HTTP is off)."""
    http = config.http
    web = load_web_config(http.web_config) if http.enabled and http.web_config is not None else None
    return dataclasses.replace(config, http=dataclasses.replace(http, web=web))


def load_web_config(path: Path) -> WebConfig:
    """Read and check the whole file; raises ``ConfigError`` naming the file's key at fault."""
    try:
        document = yaml.safe_load(path.read_bytes())
    except OSError as exc:
        raise ConfigError("http.web_config", f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("http.web_config", f"{path} is not valid YAML: {exc}") from None
    document = {} if document is None else document
    _check_keys(path, "", document, _TOP_KEYS)
    tls = document.get("tls_server_config")
    tls = {} if tls is None else tls
    _check_keys(path, "tls_server_config.", tls, _TLS_KEYS)
    return WebConfig(path=path, users=_users(path, document.get("basic_auth_users")),
                     tls=_tls(path, tls) if _tls_enabled(tls) else None)


def _error(path: Path, key: str, problem: str) -> ConfigError:
    return ConfigError(f"http.web_config: {key}", f"{problem} (in {path})")


def _check_keys(path: Path, prefix: str, table: Any, known: set[str]) -> None:
    if not isinstance(table, dict):
        raise _error(path, prefix.rstrip(".") or "(top level)", "must be a mapping")
    for key in table:
        name = f"{prefix}{key}"
        if name in _NOT_IMPLEMENTED:
            raise _error(path, name, "is an exporter-toolkit key ccos-obsd does not implement; remove it")
        if key not in known:
            raise _error(path, name, "unknown key")


def _users(path: Path, raw: Any) -> tuple[tuple[str, bytes], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise _error(path, "basic_auth_users", "must map each user name to a bcrypt hash")
    users = []
    for user, hashed in raw.items():
        key = f"basic_auth_users.{user}"
        if not isinstance(user, str) or not user or ":" in user:
            raise _error(path, key, "a user name must be a non-empty string without ':'")
        if not isinstance(hashed, str) or not _BCRYPT_HASH.fullmatch(hashed.encode()):
            raise _error(path, key, "is not a bcrypt hash ($2y$10$ and 53 characters: htpasswd -nBC 10 USER)")
        users.append((user, hashed.encode()))
    return tuple(sorted(users))


def _tls_enabled(tls: dict[str, Any]) -> bool:
    """As the toolkit decides: TLS is on when a certificate, key, client CA or client auth is set."""
    return any(tls.get(key) for key in ("cert_file", "key_file", "client_ca_file", "client_auth_type"))


def _tls(path: Path, tls: dict[str, Any]) -> TlsServerConfig:
    def file(key: str) -> Path | None:
        value = tls.get(key)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise _error(path, f"tls_server_config.{key}", "must be a file name")
        return path.parent / Path(value).expanduser()

    cert_file, key_file, ca_file = file("cert_file"), file("key_file"), file("client_ca_file")
    if cert_file is None:
        raise _error(path, "tls_server_config.cert_file", "missing (TLS needs a certificate and its key)")
    if key_file is None:
        raise _error(path, "tls_server_config.key_file", "missing (TLS needs a certificate and its key)")
    client_auth = _client_auth(path, tls.get("client_auth_type") or "NoClientCert", ca_file)
    versions = [_version(path, name, tls.get(name, default)) for name, default in
                (("min_version", "TLS12"), ("max_version", "TLS13"))]
    if _TLS_VERSIONS[versions[0]] > _TLS_VERSIONS[versions[1]]:
        raise _error(path, "tls_server_config.min_version", f"{versions[0]} is above max_version {versions[1]}")
    files = {"cert_file": cert_file, "key_file": key_file, **({"client_ca_file": ca_file} if ca_file else {})}
    contents = {key: _read(path, key, name) for key, name in files.items()}
    context = _context(path, files, contents, client_auth, versions)
    return TlsServerConfig(
        cert_file=cert_file, key_file=key_file, client_auth_type=client_auth, client_ca_file=ca_file,
        min_version=versions[0], max_version=versions[1],
        files_sha256=hashlib.sha256(b"".join(contents.values())).hexdigest(), context=context,
    )


def _client_auth(path: Path, value: Any, ca_file: Path | None) -> ClientAuthType:
    key = "tls_server_config.client_auth_type"
    if value in _UNVERIFIED_CLIENT_AUTH:
        raise _error(path, key, f"{value} accepts a client certificate without verifying it, which ccos-obsd "
                     "does not do: use VerifyClientCertIfGiven or RequireAndVerifyClientCert with client_ca_file")
    if value not in _CLIENT_AUTH:
        raise _error(path, key, f"must be one of {', '.join(_CLIENT_AUTH)} (got {value!r})")
    if value == "NoClientCert" and ca_file is not None:
        raise _error(path, key, "client_ca_file is set but client_auth_type does not ask for client certificates")
    if value != "NoClientCert" and ca_file is None:
        raise _error(path, "tls_server_config.client_ca_file",
                     f"{value} needs the CA that signs the client certificates (the system's CAs are not trusted)")
    client_auth: ClientAuthType = value
    return client_auth


def _version(path: Path, key: str, value: Any) -> str:
    if value not in _TLS_VERSIONS:
        raise _error(path, f"tls_server_config.{key}", f"must be one of {', '.join(_TLS_VERSIONS)} (got {value!r})")
    return str(value)


def _read(path: Path, key: str, name: Path) -> bytes:
    try:
        return name.read_bytes()
    except OSError as exc:
        raise _error(path, f"tls_server_config.{key}", f"cannot read {name}: {exc.strerror}") from None


def _context(
    path: Path, files: dict[str, Path], contents: dict[str, bytes], client_auth: ClientAuthType, versions: list[str]
) -> ssl.SSLContext:
    """A server context from the files, each checked on its own first so an error names its key."""
    for key, data in contents.items():
        try:
            if key == "key_file":
                load_pem_private_key(data, password=None)
            else:
                x509.load_pem_x509_certificates(data)
        except (ValueError, TypeError) as exc:
            what = "an unencrypted PEM private key" if key == "key_file" else "PEM certificates"
            raise _error(path, f"tls_server_config.{key}", f"does not hold {what}: {exc}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version, context.maximum_version = (_TLS_VERSIONS[v] for v in versions)
    context.verify_mode = _CLIENT_AUTH[client_auth]
    cert_file, key_file = files["cert_file"], files["key_file"]
    try:
        # From the paths: ssl reads only files, and the key must not be copied anywhere to do it.
        context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:
        raise _error(path, "tls_server_config.key_file", f"does not match cert_file: {exc}") from None
    if "client_ca_file" in contents:
        context.load_verify_locations(cadata=contents["client_ca_file"].decode("ascii", "replace"))
    return context


class PasswordCheck:
    """``basic_auth_users`` checked with bcrypt, and the passwords that passed remembered.

    bcrypt is slow on purpose (about 60 ms at cost 10, 260 ms at cost 12): a
    scraper sending the same password every 15 s must not pay that each time.
    A password that passed is kept as an HMAC under a key made for this process
    (never the password itself), compared in constant time; one that failed is
    not kept, so each wrong guess costs a bcrypt run. The exporter-toolkit keeps
    such a cache too. A new file (reload) makes a new check with an empty cache.
    """

    def __init__(self, users: Mapping[str, bytes]) -> None:
        self._users = dict(users)
        self._key = secrets.token_bytes(32)
        self._passed: dict[str, bytes] = {}

    def cached(self, user: str, password: str) -> bool:
        """Whether this password passed bcrypt before (no bcrypt run: fit for the event loop)."""
        passed = self._passed.get(user)
        return passed is not None and hmac.compare_digest(passed, self._digest(user, password))

    def check(self, user: str, password: str) -> bool:
        """Run bcrypt (slow: call it off the event loop); an unknown user costs the same as a known one."""
        secret = password.encode()
        hashed = self._users.get(user, self._decoy)
        matches = len(secret) <= BCRYPT_MAX_PASSWORD and bcrypt.checkpw(secret, hashed)
        if matches and user in self._users:
            self._passed[user] = self._digest(user, password)
            return True
        return False

    @cached_property
    def _decoy(self) -> bytes:
        """A hash no password matches, at the users' highest cost, so a wrong name takes as long as a wrong password."""
        # Each hash was checked at load: "$2b$" then the two-digit cost.
        cost = max((int(hashed[4:6]) for hashed in self._users.values()), default=10)
        return bcrypt.hashpw(secrets.token_bytes(16).hex().encode(), bcrypt.gensalt(cost))

    def _digest(self, user: str, password: str) -> bytes:
        return hmac.digest(self._key, f"{user}:{password}".encode(), "sha256")
