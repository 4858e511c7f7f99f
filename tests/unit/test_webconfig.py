"""The web configuration file: exporter-toolkit's keys and checks, each refusal naming its key; bcrypt's cache."""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import bcrypt
import pytest

from ccos_obsd.config import load_config
from ccos_obsd.errors import ConfigError
from ccos_obsd.reload import plan_reload
from ccos_obsd.webconfig import PasswordCheck, load_web_config, read_web_config
from tests.tls_helpers import CertificateAuthority, Issued, bcrypt_hash, make_ca, web_config


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CertificateAuthority, Issued]:
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory, "ca")
    return directory, ca, ca.issue(directory, "server")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def refusal(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_web_config(path)
    return caught.value


def test_an_empty_file_sets_nothing(tmp_path: Path) -> None:
    web = load_web_config(write(tmp_path / "web.yml", ""))
    assert web.users == () and web.tls is None and web.ssl_context is None


def test_users_and_tls_with_paths_relative_to_the_file(pki: tuple[Path, CertificateAuthority, Issued]) -> None:
    directory, _, server = pki
    path = write(directory / "web.yml", f"""
tls_server_config:
  cert_file: {server.cert.name}
  key_file: {server.key.name}
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: ca.crt
  min_version: TLS13
basic_auth_users:
  prometheus: {bcrypt_hash("secret")}
""")
    web = load_web_config(path)
    assert [user for user, _ in web.users] == ["prometheus"]
    assert web.tls is not None and web.tls.cert_file == directory / server.cert.name
    assert web.tls.client_ca_file == directory / "ca.crt"
    context = web.ssl_context
    assert context is not None and context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3 and context.maximum_version == ssl.TLSVersion.TLSv1_3


@pytest.mark.parametrize(("text", "key"), [
    ("tls_server_config: [\n", "http.web_config"),  # not YAML
    ("- a list\n", "http.web_config: (top level)"),
    ("basic_auth_user: {}\n", "http.web_config: basic_auth_user"),  # a typo
    ("rate_limit: {interval: 1s}\n", "http.web_config: rate_limit"),  # the toolkit's, not implemented
    ("http_server_config: {http2: false}\n", "http.web_config: http_server_config"),
    ("tls_server_config: {cert: PEM}\n", "http.web_config: tls_server_config.cert"),
    ("tls_server_config: {client_allowed_sans: [a]}\n", "http.web_config: tls_server_config.client_allowed_sans"),
    ("tls_server_config: {cipher_suites: [TLS_AES_128_GCM_SHA256]}\n",
     "http.web_config: tls_server_config.cipher_suites"),
    ("basic_auth_users: {alice: plaintext}\n", "http.web_config: basic_auth_users.alice"),
    ("basic_auth_users: {alice: '$2b$10$short'}\n", "http.web_config: basic_auth_users.alice"),
    ("basic_auth_users: {'a:b': '$2b$04$" + "a" * 53 + "'}\n", "http.web_config: basic_auth_users.a:b"),
    ("basic_auth_users: [alice]\n", "http.web_config: basic_auth_users"),
    ("tls_server_config: {key_file: k.pem}\n", "http.web_config: tls_server_config.cert_file"),
    ("tls_server_config: {cert_file: c.pem}\n", "http.web_config: tls_server_config.key_file"),
])
def test_a_bad_file_is_refused_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    error = refusal(write(tmp_path / "web.yml", text))
    assert error.key == key, error
    assert str(tmp_path / "web.yml") in error.problem


def tls_file(directory: Path, server: Issued, **extra: str) -> Path:
    lines = [f"  cert_file: {server.cert}", f"  key_file: {server.key}", *(f"  {k}: {v}" for k, v in extra.items())]
    return write(directory / "tls.yml", "tls_server_config:\n" + "\n".join(lines) + "\n")


@pytest.mark.parametrize(("extra", "key", "words"), [
    ({"client_auth_type": "RequireAnyClientCert"}, "client_auth_type", "without verifying"),
    ({"client_auth_type": "RequestClientCert"}, "client_auth_type", "without verifying"),
    ({"client_auth_type": "Sometimes"}, "client_auth_type", "must be one of"),
    ({"client_ca_file": "ca.crt"}, "client_auth_type", "does not ask"),  # a CA with NoClientCert, as the toolkit
    ({"client_auth_type": "RequireAndVerifyClientCert"}, "client_ca_file", "needs the CA"),
    ({"client_auth_type": "VerifyClientCertIfGiven", "client_ca_file": "missing.crt"}, "client_ca_file",
     "cannot read"),
    ({"min_version": "TLS14"}, "min_version", "must be one of"),
    ({"min_version": "TLS13", "max_version": "TLS12"}, "min_version", "above max_version"),
])
def test_tls_settings_are_checked(pki: tuple[Path, CertificateAuthority, Issued], extra: dict[str, str], key: str,
                                  words: str) -> None:
    directory, _, server = pki
    error = refusal(tls_file(directory, server, **extra))
    assert error.key == f"http.web_config: tls_server_config.{key}"
    assert words in error.problem


def test_unreadable_or_wrong_certificate_files_are_named(pki: tuple[Path, CertificateAuthority, Issued],
                                                        tmp_path: Path) -> None:
    _, ca, server = pki
    missing = Issued(tmp_path / "nope.crt", server.key)
    assert refusal(tls_file(tmp_path, missing)).key.endswith("tls_server_config.cert_file")
    garbage = Issued(write(tmp_path / "garbage.crt", "not a certificate"), server.key)
    assert refusal(tls_file(tmp_path, garbage)).key.endswith("tls_server_config.cert_file")
    not_a_key = Issued(server.cert, server.cert)
    assert refusal(tls_file(tmp_path, not_a_key)).key.endswith("tls_server_config.key_file")
    other = ca.issue(tmp_path, "other")
    mismatched = Issued(server.cert, other.key)
    error = refusal(tls_file(tmp_path, mismatched))
    assert error.key.endswith("tls_server_config.key_file") and "does not match" in error.problem


def test_the_file_is_read_by_the_daemon_only_and_a_renewed_certificate_is_a_change(
    pki: tuple[Path, CertificateAuthority, Issued], tmp_path: Path
) -> None:
    _, ca, _ = pki
    server = ca.issue(tmp_path, "renewed")
    path = tls_file(tmp_path, server)
    config = load_config(overrides={"state_dir": str(tmp_path), "http.web_config": str(path)})
    assert config.http.web_config == path and config.http.web is None  # clients never read it
    running = read_web_config(config)
    assert running.http.web is not None and running.http.web.tls is not None
    assert plan_reload(running, read_web_config(config)).applied == ()
    ca.issue(tmp_path, "renewed")  # same names, new certificate and key
    plan = plan_reload(running, read_web_config(config))
    assert plan.applied == ("http.web_config",)
    assert plan.config.http.web is not None and plan.config.http.web.ssl_context is not running.http.web.ssl_context


def test_http_off_reads_no_web_config(tmp_path: Path) -> None:
    config = load_config(overrides={"state_dir": str(tmp_path), "http.enabled": "false",
                                    "http.web_config": str(tmp_path / "absent.yml")})
    assert read_web_config(config).http.web is None


# --- passwords


def test_a_password_passes_once_through_bcrypt_then_from_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    check = PasswordCheck({"prometheus": bcrypt_hash("secret").encode()})
    runs: list[bytes] = []
    real = bcrypt.checkpw
    monkeypatch.setattr(bcrypt, "checkpw", lambda password, hashed: runs.append(password) or real(password, hashed))
    assert not check.cached("prometheus", "secret")
    assert check.check("prometheus", "secret")
    assert check.cached("prometheus", "secret") and len(runs) == 1
    assert not check.cached("prometheus", "Secret") and not check.cached("grafana", "secret")
    # A wrong password is not remembered: each guess costs a bcrypt run.
    assert not check.check("prometheus", "guess") and not check.check("prometheus", "guess")
    assert len(runs) == 3


def test_an_unknown_user_costs_a_bcrypt_run_at_the_users_cost() -> None:
    check = PasswordCheck({"prometheus": bcrypt_hash("secret", cost=8).encode()})
    timings = {}
    for user in ("prometheus", "stranger"):
        started = time.perf_counter()
        assert not check.check(user, "wrong")
        timings[user] = time.perf_counter() - started
    # Cost 8 is ~4 ms: a missing run would be 100 times faster, not within a factor of 3.
    assert timings["stranger"] > timings["prometheus"] / 3, timings


def test_a_password_longer_than_bcrypt_reads_is_refused() -> None:
    password = "p" * 72
    check = PasswordCheck({"long": bcrypt_hash(password).encode()})
    assert check.check("long", password)
    assert not check.check("long", password + "x")  # bcrypt would ignore the 73rd byte


def test_htpasswd_2y_hashes_are_accepted(tmp_path: Path) -> None:
    hashed = "$2y$" + bcrypt_hash("secret")[4:]  # what htpasswd -nB writes
    web = load_web_config(write(tmp_path / "web.yml", f"basic_auth_users:\n  alice: '{hashed}'\n"))
    assert web.passwords.check("alice", "secret")


def test_a_new_file_starts_with_an_empty_cache(tmp_path: Path) -> None:
    path = web_config(tmp_path / "web.yml", users={"alice": "one"})
    first = load_web_config(path)
    assert first.passwords.check("alice", "one") and first.passwords.cached("alice", "one")
    web_config(path, users={"alice": "two"})
    second = load_web_config(path)
    assert not second.passwords.cached("alice", "one") and not second.passwords.check("alice", "one")
    assert second.passwords.check("alice", "two")


def test_the_shipped_example_loads_and_sets_nothing() -> None:
    shipped = Path(__file__).resolve().parents[2] / "config" / "web-config.yml"
    web = load_web_config(shipped)
    assert web.users == () and web.tls is None  # all commented out: content routes stay refused
    example = next(line.split(": ", 1)[1] for line in shipped.read_text().splitlines() if "prometheus: $2y$" in line)
    assert PasswordCheck({"prometheus": example.encode()}).check("prometheus", "wrong") is False  # a bcrypt hash
