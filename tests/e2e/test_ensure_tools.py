"""``scripts/ensure-tools``: what ``make test`` does first on a machine that lacks a Debian tool.

The script runs for real, with a PATH of stand-ins: executables named like the tools
(and a fake ``apt-get`` that records its arguments), so nothing is removed from or
installed on this machine. Run as root it installs what is missing; as another user
it stops with one line naming the command to run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ensure-tools"
NOBODY = 65534
ANOTHER_USER = NOBODY if os.geteuid() == 0 else None  # None: this user, who is not root either
EVERY_COMMAND = ("python3", "promtool", "prometheus", "sqlite3", "socat", "curl", "systemd-analyze",
                 "systemd-socket-activate", "systemd-sysusers", "nats-server")

requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="runs the script as root")


@pytest.fixture
def bin_dir() -> Iterator[Path]:
    """A directory other users can read, to be the whole PATH: bash and a stand-in per tool.

    It holds a copy of the script too: the checkout may be where other users cannot read (/root).
    """
    with tempfile.TemporaryDirectory(prefix="ccos-tools-") as directory:
        os.chmod(directory, 0o755)  # noqa: S103 - the script also runs as another user
        path = Path(directory)
        bash = shutil.which("bash")
        assert bash is not None
        (path / "bash").symlink_to(bash)
        shutil.copy(SCRIPT, path / SCRIPT.name)
        for command in EVERY_COMMAND:
            stand_in(path, command)
        yield path


def stand_in(bin_dir: Path, command: str, exit_code: int = 0) -> None:
    (bin_dir / command).write_text(f"#!/bin/sh\nexit {exit_code}\n")
    (bin_dir / command).chmod(0o755)


def fake_apt_get(bin_dir: Path) -> None:
    """An apt-get that records each call and "installs" prometheus: its two commands appear in bin_dir."""
    (bin_dir / "apt-get").write_text(f"""#!/bin/sh
echo "DEBIAN_FRONTEND=$DEBIAN_FRONTEND $*" >> {bin_dir}/apt-get.log
if [ "$1" = install ]; then
  for tool in promtool prometheus; do printf '#!/bin/sh\\n' > {bin_dir}/$tool; /bin/chmod 755 {bin_dir}/$tool; done
fi
""")
    (bin_dir / "apt-get").chmod(0o755)


def ensure_tools(bin_dir: Path, *args: str, uid: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(bin_dir / SCRIPT.name), *args], env={"PATH": str(bin_dir)},
                          capture_output=True, text=True, timeout=60, check=False,
                          user=uid, group=uid, extra_groups=None if uid is None else [])


def test_with_every_tool_present_it_does_nothing(bin_dir: Path) -> None:
    result = ensure_tools(bin_dir)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_another_user_is_told_in_one_line_what_to_install(bin_dir: Path) -> None:
    (bin_dir / "promtool").unlink()
    result = ensure_tools(bin_dir, uid=ANOTHER_USER)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == ("make test needs Debian packages that are missing; "
                             "run: sudo apt-get install --no-install-recommends prometheus\n")


def test_make_run_asks_only_for_what_running_needs(bin_dir: Path) -> None:
    (bin_dir / "promtool").unlink()
    stand_in(bin_dir, "python3", exit_code=1)  # python3 without ensurepip: no python3-venv
    result = ensure_tools(bin_dir, "run", uid=ANOTHER_USER)
    assert result.returncode == 1
    assert result.stderr == ("make run needs Debian packages that are missing; "
                             "run: sudo apt-get install --no-install-recommends python3-venv\n")


@requires_root
def test_root_installs_what_is_missing_with_apt_get(bin_dir: Path) -> None:
    (bin_dir / "promtool").unlink()
    (bin_dir / "prometheus").unlink()
    fake_apt_get(bin_dir)
    result = ensure_tools(bin_dir)
    assert result.returncode == 0, result.stderr
    assert (bin_dir / "apt-get.log").read_text().splitlines() == [
        "DEBIAN_FRONTEND=noninteractive update -qq",
        "DEBIAN_FRONTEND=noninteractive install -y -qq --no-install-recommends prometheus",
    ]
    assert ensure_tools(bin_dir).stderr == ""  # installed: the next run does nothing


@requires_root
def test_root_fails_when_apt_get_did_not_provide_the_tool(bin_dir: Path) -> None:
    (bin_dir / "socat").unlink()
    stand_in(bin_dir, "apt-get")
    result = ensure_tools(bin_dir)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == "ensure-tools: still missing after apt-get install: socat"
