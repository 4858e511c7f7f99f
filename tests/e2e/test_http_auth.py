"""The HTTP port, secure by default, and Prometheus's web configuration file (TLS, mTLS, basic auth).

A CA and its certificates are made in the tests (``tests.tls_helpers``). The daemon
runs as a process with a web config; clients are curl, Python's ssl and a real
Prometheus. Without HTTP authentication, every route that returns ledger content
answers 401, also to uid 65534 (nobody) on the same host, while /metrics answers.
"""

from __future__ import annotations

import copy
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.daemon import DaemonProcess, basic_auth, run_cli
from tests.e2e.test_prometheus import Prometheus, wait_for
from tests.e2e.test_systemd import ActivatedDaemon, free_port
from tests.tls_helpers import CertificateAuthority, Issued, make_ca, web_config

SECRET = "API_KEY=sk-live-123"  # noqa: S105 - the secret an agent logged by mistake, in the issue
CONTENT_ROUTES = ["/v1/entries/0", "/v1/actions/a-secret", "/v1/query", "/v1/stats", "/v1/logs",
                  "/v1/wm/search", "/v1/proof/inclusion?seq=0"]
OPEN_ROUTES = ["/metrics", "/healthz", "/v1/checkpoint", "/v1/proof/consistency?size1=1&size2=1"]
REALM = 'Basic realm="ccos-obsd"'
SHIPPED_PROMETHEUS = Path(__file__).resolve().parents[2] / "config" / "prometheus" / "prometheus.yml"


@dataclass(frozen=True)
class Pki:
    directory: Path
    ca: CertificateAuthority
    server: Issued
    client: Issued
    stranger: Issued
    """A client certificate from another CA."""


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    with tempfile.TemporaryDirectory(prefix="ccos-pki-") as name:
        directory = Path(name)
        ca = make_ca(directory, "ca")
        other = make_ca(directory, "other-ca")
        yield Pki(directory, ca, ca.issue(directory, "server"), ca.issue(directory, "client", client=True),
                  other.issue(directory, "stranger", client=True))


def tls_settings(pki: Pki, client_auth: str = "NoClientCert") -> dict[str, Any]:
    settings: dict[str, Any] = {"cert_file": pki.server.cert, "key_file": pki.server.key}
    if client_auth != "NoClientCert":
        settings |= {"client_auth_type": client_auth, "client_ca_file": pki.ca.cert_file}
    return settings


def client_context(pki: Pki, cert: Issued | None = None, tls12: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca.cert_file)
    if cert is not None:
        context.load_cert_chain(cert.cert, cert.key)
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def start(state_dir: Path, web: Path | None = None, **options: Any) -> DaemonProcess:
    args = ["--web-config", str(web)] if web is not None else []
    return DaemonProcess(state_dir, *args, **options).start()


def append_secret(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        client.append({"action_type": "CapabilityCall", "action_id": "a-secret", "function_name": "shell.run",
                       "arguments": [SECRET]})
        # Every read route then has something to show: the first commit is checkpointed at once.
        wait_for(lambda: client.request({"op": "checkpoint"})["ok"], "the first checkpoint", timeout=30)
        wait_for(lambda: client.request({"op": "wm_search"}).get("entries"), "Working Memory", timeout=30)


def get(daemon: DaemonProcess, path: str, *, auth: tuple[str, str] | None = None,
        context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = {"Authorization": basic_auth(*auth)} if auth else {}
    saved = daemon.http_auth, daemon.ssl_context
    daemon.http_auth, daemon.ssl_context = None, context or daemon.ssl_context
    try:
        return daemon.get(path, headers)
    finally:
        daemon.http_auth, daemon.ssl_context = saved


def last_event(daemon: DaemonProcess, event: str) -> dict[str, Any]:
    """The latest log line with this event among those read so far (up to ready, or to a reload's line)."""
    return next(e for e in reversed(daemon.log) if isinstance(e, dict) and e.get("event") == event)


def assert_refused(status: int, headers: dict[str, str], body: bytes, *, names: str) -> None:
    assert status == 401
    assert headers["WWW-Authenticate"] == REALM
    error = json.loads(body)["error"]
    assert error["code"] == "unauthorized" and names in error["message"], error
    assert SECRET.encode() not in body


def curl(url: str, *args: str, as_nobody: bool = False) -> tuple[int, str]:
    """curl's exit code and the HTTP status it printed ("000": no HTTP answer)."""
    command = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "20", *args, url]
    if as_nobody:
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    return result.returncode, result.stdout


# --- secure by default


def test_content_routes_answer_401_without_http_auth_and_the_others_stay_open(state_dir: Path) -> None:
    daemon = start(state_dir)
    try:
        append_secret(daemon)
        for route in CONTENT_ROUTES:
            assert_refused(*get(daemon, route), names="http.web_config")
            # Credentials mean nothing while no users are configured.
            assert get(daemon, route, auth=("admin", "admin"))[0] == 401
        for route in OPEN_ROUTES:
            assert get(daemon, route)[0] == 200, route
        assert get(daemon, "/nowhere")[0] == 404
        access = last_event(daemon, "http_access")
        assert access["content_routes"].startswith("refused") and access["tls"] is False
    finally:
        assert daemon.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run curl as uid 65534")
def test_as_nobody_every_content_route_gets_401_while_metrics_answers(state_dir: Path) -> None:
    daemon = start(state_dir)
    try:
        append_secret(daemon)
        assert curl(f"{daemon.http}/metrics", as_nobody=True) == (0, "200")
        for route in CONTENT_ROUTES:
            assert curl(f"{daemon.http}{route}", as_nobody=True) == (0, "401"), route
        body = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "curl", "-sS",
                               f"{daemon.http}/v1/entries/0"], capture_output=True, timeout=60, check=True).stdout
        assert b"unauthorized" in body and SECRET.encode() not in body
    finally:
        assert daemon.stop() == 0


# --- basic auth, TLS, mTLS


def test_basic_auth_users_guard_every_route(state_dir: Path, pki: Pki) -> None:
    web = web_config(pki.directory / "users.yml", users={"reader": "correct-horse"})
    daemon = start(state_dir, web)
    try:
        append_secret(daemon)
        for route in CONTENT_ROUTES + OPEN_ROUTES:
            assert get(daemon, route, auth=("reader", "correct-horse"))[0] == 200, route
            assert_refused(*get(daemon, route, auth=("reader", "wrong-guess")), names="basic_auth_users")
            assert_refused(*get(daemon, route, auth=("nobody", "correct-horse")), names="basic_auth_users")
            assert_refused(*get(daemon, route), names="basic_auth_users")
        assert get(daemon, "/nowhere")[0] == 401  # nothing, not even what exists, without a user
        assert SECRET.encode() in get(daemon, "/v1/entries/0", auth=("reader", "correct-horse"))[2]
        bad = daemon.wait_for_event("http_bad_password")
        assert bad["user"] == "reader" and "wrong-guess" not in json.dumps(bad)  # no password in the log
    finally:
        assert daemon.stop() == 0


def test_https_with_basic_auth_by_curl(state_dir: Path, pki: Pki) -> None:
    web = web_config(pki.directory / "https.yml", users={"reader": "good"}, tls=tls_settings(pki))
    daemon = start(state_dir, web)
    try:
        append_secret(daemon)
        url = f"https://{daemon.ready['http']}/v1/entries/0"
        ca = ["--cacert", str(pki.ca.cert_file)]
        assert curl(url, *ca, "-u", "reader:good") == (0, "200")
        assert curl(url, *ca, "-u", "reader:bad") == (0, "401")
        assert curl(url, *ca) == (0, "401")
        assert curl(f"https://{daemon.ready['http']}/metrics", *ca) == (0, "401")
        assert curl(url, "-u", "reader:good")[0] == 60  # the certificate is checked: not from a known CA
        assert curl(f"http://{daemon.ready['http']}/metrics")[1] == "000"  # no plain HTTP on a TLS port
        entry = subprocess.run(["curl", "-sS", *ca, "-u", "reader:good", url], capture_output=True, timeout=60,
                               check=True).stdout
        assert json.loads(entry)["seq"] == 0
    finally:
        assert daemon.stop() == 0


def handshake_refusal(daemon: DaemonProcess, context: ssl.SSLContext) -> str | None:
    """Where the connection failed ("handshake: ..." or "request: ..."), or None when a request is answered."""
    host, port = daemon.ready["http"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        try:
            tls = context.wrap_socket(raw, server_hostname=host)
        except (ssl.SSLError, ConnectionResetError) as exc:
            return f"handshake: {exc}"
        with tls:
            try:
                tls.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                answer = tls.recv(64)
            except (ssl.SSLError, ConnectionResetError) as exc:
                return f"request: {exc}"
    return None if answer.startswith(b"HTTP/1.") else f"request: no answer ({answer!r})"


def test_mtls_required_a_certificate_from_the_ca_is_served_others_fail_the_handshake(
    state_dir: Path, pki: Pki
) -> None:
    web = web_config(pki.directory / "mtls.yml", tls=tls_settings(pki, "RequireAndVerifyClientCert"))
    daemon = start(state_dir, web)
    try:
        append_secret(daemon)
        trusted = client_context(pki, pki.client)
        # A verified client certificate is HTTP authentication enough: the content routes answer.
        for route in CONTENT_ROUTES + OPEN_ROUTES:
            assert get(daemon, route, context=trusted)[0] == 200, route
        assert handshake_refusal(daemon, trusted) is None
        # In TLS 1.2 the server ends the handshake on the certificate; in TLS 1.3 the client's
        # side of the handshake is over before the server checks it, and the request gets no answer.
        for tls12, stage in ((True, "handshake: "), (False, "request: ")):
            for certificate in (pki.stranger, None):
                refused = handshake_refusal(daemon, client_context(pki, certificate, tls12=tls12))
                assert refused is not None and refused.startswith(stage), (certificate, refused)
        assert last_event(daemon, "http_access")["content_routes"] == "client_certificate"
        code, status = curl(f"https://{daemon.ready['http']}/v1/stats", "--cacert", str(pki.ca.cert_file),
                            "--cert", str(pki.client.cert), "--key", str(pki.client.key))
        assert (code, status) == (0, "200")
    finally:
        assert daemon.stop() == 0


def test_mtls_if_given_a_client_without_a_certificate_gets_only_the_open_routes(state_dir: Path, pki: Pki) -> None:
    web = web_config(pki.directory / "mtls-optional.yml", tls=tls_settings(pki, "VerifyClientCertIfGiven"))
    daemon = start(state_dir, web)
    try:
        append_secret(daemon)
        anonymous, trusted = client_context(pki), client_context(pki, pki.client)
        for route in OPEN_ROUTES:
            assert get(daemon, route, context=anonymous)[0] == 200, route
        for route in CONTENT_ROUTES:
            assert_refused(*get(daemon, route, context=anonymous), names="http.web_config")
            assert get(daemon, route, context=trusted)[0] == 200, route
        assert handshake_refusal(daemon, client_context(pki, pki.stranger, tls12=True)) is not None
    finally:
        assert daemon.stop() == 0


def test_https_on_the_port_systemd_passed(state_dir: Path, pki: Pki) -> None:
    web = web_config(pki.directory / "activated.yml", users={"reader": "good"}, tls=tls_settings(pki))
    port = free_port()
    daemon = ActivatedDaemon(state_dir, [str(state_dir / "in.sock"), f"127.0.0.1:{port}"], "ingest:http",
                             "--web-config", str(web)).start(wait=False)
    try:
        # systemd-socket-activate starts the daemon at the first connection: this one.
        wait_for(lambda: curl(f"https://127.0.0.1:{port}/healthz", "--cacert", str(pki.ca.cert_file),
                              "-u", "reader:good") == (0, "200"), "HTTPS on the passed socket", timeout=30)
        assert daemon.wait_ready()["http"] == f"127.0.0.1:{port}"
    finally:
        assert daemon.stop() == 0


# --- start-up and reload


@pytest.mark.parametrize(("text", "key"), [
    ("basic_auth_users: {reader: not-a-hash}\n", "http.web_config: basic_auth_users.reader"),
    ("tls_server_config: {cert_file: missing.crt, key_file: missing.key}\n",
     "http.web_config: tls_server_config.cert_file"),
    ("rate_limit: {interval: 1s, burst: 5}\n", "http.web_config: rate_limit"),
    ("basic_auth_users: [\n", "http.web_config"),
])
def test_a_bad_web_config_stops_the_start_with_exit_2_naming_the_key(state_dir: Path, text: str, key: str) -> None:
    web = state_dir / "web.yml"
    web.write_text(text)
    result = run_cli("run", "--state-dir", str(state_dir), "--http", "127.0.0.1:0", "--web-config", str(web))
    assert result.returncode == 2
    assert f"config {key}:" in result.stderr.decode()
    assert not (state_dir / "ledger.db").exists()  # refused before anything was made


def reload(daemon: DaemonProcess, event: str = "config_reloaded") -> dict[str, Any]:
    daemon.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    return daemon.wait_for_event(event)


def test_reload_changes_the_users_and_keeps_them_when_the_new_file_is_bad(state_dir: Path, pki: Pki) -> None:
    web = web_config(state_dir / "web.yml", users={"alice": "one"})
    daemon = start(state_dir, web)
    try:
        append_secret(daemon)
        assert get(daemon, "/v1/stats", auth=("alice", "one"))[0] == 200
        web_config(web, users={"bob": "two"})
        assert reload(daemon)["changed"] == ["http.web_config"]
        assert get(daemon, "/v1/stats", auth=("alice", "one"))[0] == 401
        assert get(daemon, "/v1/stats", auth=("bob", "two"))[0] == 200
        for text, key in [
            ("basic_auth_users: {bob: '$2b$10$tooshort'}\n", "http.web_config: basic_auth_users.bob"),
            ("basic_auth_users: {bob: x}\nextra: 1\n", "http.web_config: extra"),
            ("basic_auth_users: {bob\n", "http.web_config"),
            (f"tls_server_config: {{cert_file: {pki.server.cert}, key_file: {state_dir / 'gone.key'}}}\n",
             "http.web_config: tls_server_config.key_file"),
        ]:
            web.write_text(text)
            failed = reload(daemon, "config_reload_failed")
            assert failed["key"] == key
            assert get(daemon, "/v1/stats", auth=("bob", "two"))[0] == 200
            assert get(daemon, "/metrics")[0] == 401
    finally:
        assert daemon.stop() == 0


def served_certificate(daemon: DaemonProcess, pki: Pki) -> bytes:
    host, port = daemon.ready["http"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            client_context(pki).wrap_socket(raw, server_hostname=host) as tls:
        certificate = tls.getpeercert(binary_form=True)
        assert certificate is not None
        return certificate


def test_reload_turns_tls_on_and_serves_a_renewed_certificate_to_new_connections(state_dir: Path, pki: Pki) -> None:
    directory = state_dir / "tls"
    directory.mkdir()
    server = pki.ca.issue(directory, "server")
    web = web_config(state_dir / "web.yml", users={"reader": "good"})
    daemon = start(state_dir, web)
    try:
        append_secret(daemon)
        host, port = daemon.ready["http"].rsplit(":", 1)
        plain = http.client.HTTPConnection(host, int(port), timeout=10)  # kept open across the reloads
        assert keep_alive_get(plain) == 200

        web_config(web, users={"reader": "good"}, tls={"cert_file": server.cert, "key_file": server.key})
        assert reload(daemon)["changed"] == ["http.web_config"]
        assert last_event(daemon, "http_access")["tls"] is True
        daemon.ssl_context = client_context(pki)
        assert get(daemon, "/v1/stats", auth=("reader", "good"))[0] == 200
        first = served_certificate(daemon, pki)
        assert keep_alive_get(plain) == 200  # the connection from before carries on as it was

        pki.ca.issue(directory, "server")  # renewed in place, as certbot or cert-manager would
        assert served_certificate(daemon, pki) == first  # until the reload
        assert reload(daemon)["changed"] == ["http.web_config"]
        assert served_certificate(daemon, pki) != first
        assert get(daemon, "/v1/stats", auth=("reader", "good"))[0] == 200
    finally:
        plain.close()
        assert daemon.stop() == 0


def keep_alive_get(connection: http.client.HTTPConnection) -> int:
    connection.request("GET", "/v1/stats", headers={"Authorization": basic_auth("reader", "good")})
    response = connection.getresponse()
    response.read()
    return response.status


# --- a real Prometheus


def shipped_scrape_job() -> dict[str, Any]:
    """The job of config/prometheus/prometheus.yml with its commented TLS and basic auth settings taken in."""
    commented = re.compile(r"^(    )# (scheme: .*|basic_auth:.*|tls_config:.*|  (username|password_file|ca_file|"
                           r"server_name|cert_file|key_file): .*)$")
    lines = [commented.sub(r"\1\2", line) for line in SHIPPED_PROMETHEUS.read_text().splitlines()]
    job: dict[str, Any] = yaml.safe_load("\n".join(lines))["scrape_configs"][0]
    assert job["scheme"] == "https" and set(job["basic_auth"]) == {"username", "password_file"}
    assert set(job["tls_config"]) == {"ca_file", "server_name", "cert_file", "key_file"}
    return job


def test_prometheus_scrapes_over_tls_with_basic_auth_and_a_client_certificate(state_dir: Path, pki: Pki) -> None:
    """The shipped scrape settings, uncommented, against a daemon with HTTPS, mTLS and a user."""
    web = web_config(pki.directory / "scraped.yml", users={"prometheus": "scrape-secret"},
                     tls=tls_settings(pki, "RequireAndVerifyClientCert"))
    daemon = start(state_dir, web)
    try:
        append_secret(daemon)
        with tempfile.TemporaryDirectory(prefix="ccos-prom-") as name:
            workdir = Path(name)
            (workdir / "good").write_text("scrape-secret")
            (workdir / "wrong").write_text("guess")
            job = shipped_scrape_job()
            job["static_configs"] = [{"targets": [daemon.ready["http"]]}]
            del job["scrape_timeout"]  # 10 s, above the tests' 1 s interval
            job["basic_auth"]["password_file"] = str(workdir / "good")
            job["tls_config"] |= {"ca_file": str(pki.ca.cert_file), "cert_file": str(pki.client.cert),
                                  "key_file": str(pki.client.key)}
            wrong_password = copy.deepcopy(job) | {"job_name": "wrong-password"}
            wrong_password["basic_auth"]["password_file"] = str(workdir / "wrong")
            no_client_cert = copy.deepcopy(job) | {"job_name": "no-client-cert"}
            del no_client_cert["tls_config"]["cert_file"], no_client_cert["tls_config"]["key_file"]
            prometheus = Prometheus(workdir, scrape_configs=[job, wrong_password, no_client_cert])
            try:
                wait_for(prometheus.ready, "prometheus to be ready")
                wait_for(lambda: prometheus.value('up{job="ccos-obsd"}') == 1, "a scrape over TLS with basic auth")
                assert prometheus.value('ccos_ledger_entries{job="ccos-obsd"}') == 1
                wait_for(lambda: prometheus.value('up{job="wrong-password"}') == 0, "the wrong password refused")
                wait_for(lambda: prometheus.value('up{job="no-client-cert"}') == 0, "no client certificate refused")
                targets = prometheus.get("/api/v1/targets")["data"]["activeTargets"]
                errors = {t["labels"]["job"]: t["lastError"] for t in targets}
                assert errors["ccos-obsd"] == "" and "401" in errors["wrong-password"], errors
            finally:
                prometheus.stop()
    finally:
        assert daemon.stop() == 0


def test_a_remembered_password_skips_bcrypt(state_dir: Path) -> None:
    """A scraper's password passes bcrypt once (cost 12: about 260 ms here); later scrapes are far faster."""
    import bcrypt

    hashed = bcrypt.hashpw(b"scrape-secret", bcrypt.gensalt(12)).decode()
    web = state_dir / "web.yml"
    web.write_text(f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    daemon = start(state_dir, web)
    try:
        def scrape_seconds() -> float:
            started = time.perf_counter()
            assert get(daemon, "/metrics", auth=("prometheus", "scrape-secret"))[0] == 200
            return time.perf_counter() - started

        first = scrape_seconds()
        later = sorted(scrape_seconds() for _ in range(9))[4]
        assert later < first / 3, (first, later)
    finally:
        assert daemon.stop() == 0
