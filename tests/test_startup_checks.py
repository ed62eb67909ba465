"""What the server refuses at start-up, and the files it creates: exposure without
authentication, secrets others could change or read, a database readable by other users."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bench.harness import free_port
from scanjobs.client import ScanClient, TlsFiles
from scanjobs.server.config import parse_args
from tests.certs import Authority
from tests.conftest import SERVER, ServeFactory

REFUSED = "without authentication"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    tokens = tmp_path / "tokens"
    tokens.write_text("t1\n")
    tokens.chmod(0o600)
    ca = Authority(tmp_path, "ca")
    server = ca.issue("server", server=True)
    return {"tokens": tokens, "cert": server.cert, "key": server.key, "ca": ca.pair.cert}


def _argv(files: dict[str, Path], *extra: str) -> list[str]:
    return ["--root", "/srv", *(a.format(**files) for a in extra)]


TLS = ("--tls-cert", "{cert}", "--tls-key", "{key}")


@pytest.mark.parametrize(
    ("extra", "ok"),
    [
        ((), False),
        (TLS, False),  # TLS hides the calls from the network, not from whoever connects
        (("--insecure",), True),
        (("--token-file", "{tokens}"), True),
        ((*TLS, "--token-file", "{tokens}"), True),
        ((*TLS, "--tls-client-ca", "{ca}"), True),
    ],
    ids=["nothing", "tls only", "insecure", "token", "tls and token", "mutual tls"],
)
def test_non_loopback_listen_needs_a_token_a_client_ca_or_insecure(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], ok: bool
) -> None:
    argv = _argv(files, "--listen", "0.0.0.0:50051", *extra)
    if ok:
        assert parse_args(argv).listen == "0.0.0.0:50051"
        return
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert f"refusing to listen on 0.0.0.0:50051 {REFUSED}" in capsys.readouterr().err


def test_a_tls_only_server_on_every_interface_refuses_to_start(
    files: dict[str, Path], tmp_path: Path
) -> None:
    argv = _argv(files, "--listen", f"0.0.0.0:{free_port()}", *TLS)
    proc = subprocess.run(
        [*SERVER, *argv, "--data-dir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert REFUSED in proc.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    ("extra", "ok"),
    [
        (("--metrics-listen", "127.0.0.1:9100"), True),
        (("--metrics-listen", ":9100"), True),  # no host: served on loopback
        (("--metrics-listen", "0.0.0.0:9100", "--token-file", "{tokens}"), False),
        (("--metrics-listen", "0.0.0.0:9100", *TLS, "--token-file", "{tokens}"), False),
        (("--metrics-listen", "0.0.0.0:9100", *TLS, "--tls-client-ca", "{ca}"), True),
        (("--metrics-listen", "0.0.0.0:9100", "--insecure"), True),
    ],
    ids=["loopback", "no host", "token", "tls and token", "mutual tls", "insecure"],
)
def test_non_loopback_metrics_need_mutual_tls_or_insecure(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], ok: bool
) -> None:
    argv = _argv(files, *extra)
    if ok:
        assert parse_args(argv).metrics_listen
        return
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert f"refusing to serve metrics on 0.0.0.0:9100 {REFUSED}" in capsys.readouterr().err


def _scrape(address: str, context: ssl.SSLContext) -> str:
    try:
        with urllib.request.urlopen(f"https://{address}/metrics", context=context, timeout=5):
            return "ok"
    except (urllib.error.URLError, ssl.SSLError, ConnectionError):
        return "refused"


async def test_metrics_over_mutual_tls_admit_only_clients_with_our_certificate(
    serve: ServeFactory, media: Path, tmp_path: Path
) -> None:
    ca = Authority(tmp_path, "metrics-ca")
    server, client = ca.issue("server", server=True), ca.issue("client", server=False)
    metrics_at = f"127.0.0.1:{free_port()}"
    s = await serve(
        media,
        tls_cert=server.cert,
        tls_key=server.key,
        tls_client_ca=ca.pair.cert,
        metrics_listen=metrics_at,
    )
    async with ScanClient(s.address, tls=TlsFiles(ca.pair.cert, client.cert, client.key)):
        pass
    anonymous = ssl.create_default_context(cafile=ca.pair.cert)
    ours = ssl.create_default_context(cafile=ca.pair.cert)
    ours.load_cert_chain(client.cert, client.key)
    assert await asyncio.to_thread(_scrape, metrics_at, ours) == "ok"
    assert await asyncio.to_thread(_scrape, metrics_at, anonymous) == "refused"


@pytest.mark.parametrize(
    ("mode", "ok"), [(0o600, True), (0o644, True), (0o620, False), (0o602, False), (0o666, False)]
)
def test_a_token_file_others_can_write_is_refused(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], mode: int, ok: bool
) -> None:
    files["tokens"].chmod(mode)
    argv = _argv(files, "--token-file", "{tokens}")
    if ok:
        assert parse_args(argv).tokens == frozenset({"t1"})
        return
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert "is writable by its group or by others" in capsys.readouterr().err


def test_a_database_password_belongs_in_the_environment_not_on_the_command_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with_password = "postgresql://scanjobs:s3cret@db.internal/scanjobs"
    with pytest.raises(SystemExit):
        parse_args(["--root", "/srv", "--database", with_password])
    err = capsys.readouterr().err
    assert "--database carries a password" in err and "s3cret" not in err
    without = "postgresql://scanjobs@db.internal/scanjobs"
    assert parse_args(["--root", "/srv", "--database", without]).database == without
    monkeypatch.setenv("SCANJOBS_DATABASE", with_password)
    assert parse_args(["--root", "/srv"]).database == with_password


async def test_the_sqlite_database_and_its_wal_files_are_created_private(
    serve: ServeFactory, media: Path, tmp_path: Path
) -> None:
    old = os.umask(0o022)
    try:
        s = await serve(media)
    finally:
        os.umask(old)
    async with ScanClient(s.address) as client:
        job = await client.submit(str(media))
        async for _ in client.watch(job.id):
            pass
    data = tmp_path / "data0"  # the serve fixture's data directory
    modes = {
        p.name: oct(p.stat().st_mode & 0o777) for p in data.iterdir() if "scanjobs.db" in p.name
    }
    assert {modes[n] for n in ("scanjobs.db", "scanjobs.db-wal", "scanjobs.db-shm")} == {"0o600"}
    assert oct(data.stat().st_mode & 0o777) == "0o700"
