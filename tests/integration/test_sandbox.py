"""fedlora.sandbox's kernel boundary: each attack a hostile program tried against the old Python-level guards
(issue 21, items 3-6) now meets the kernel, and the caller's files, sockets and processes stay untouched.

Every test here runs real programs in bubblewrap + a cgroup; they skip where the boundary cannot be set up and
fail in CI (see conftest.sandbox_ready).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedlora.sandbox import Limits, ProgramResult, run_program

pytestmark = pytest.mark.usefixtures("sandbox_ready")
FAST = Limits(timeout_s=5.0, cpu_s=5, memory_mb=512)


def _alive_with(marker: str, wait_s: float = 3.0) -> list[int]:
    """Pids whose command line contains ``marker``, still alive after up to ``wait_s`` (SIGKILL is asynchronous)."""
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and entry.name != str(os.getpid()):
                try:
                    if marker.encode() in (entry / "cmdline").read_bytes():
                        found.append(int(entry.name))
                except OSError:
                    continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Path]:
    """A folder of the caller's with a 0600 secret and a sentinel; afterwards both must be exactly as they were."""
    secret = tmp_path / "token"
    secret.write_text("hunter2")
    secret.chmod(0o600)
    (tmp_path / "sentinel.txt").write_text("keep me")
    yield tmp_path
    assert secret.read_text() == "hunter2" and (tmp_path / "sentinel.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sentinel.txt", "token"]


def _exited(result: ProgramResult, code: int = 0) -> str:
    assert result.status == "exited" and result.returncode == code, result
    return result.output


def test_exit_status_output_and_timeouts() -> None:
    assert _exited(run_program("print('hi')", FAST)) == "hi\n"
    assert "AssertionError" in _exited(run_program("assert 1 == 2", FAST), 1)
    assert run_program("import sys\nsys.exit(3)", FAST).returncode == 3
    spin = run_program("while True:\n    pass", Limits(timeout_s=30.0, cpu_s=1))
    assert spin.status == "timeout" and spin.seconds < 20, spin  # RLIMIT_CPU
    sleep = run_program("import time\ntime.sleep(60)", Limits(timeout_s=1.0))
    assert sleep.status == "timeout" and sleep.seconds < 10, sleep  # the wall clock, from outside
    tail = run_program("print('a' * 100000)\nprint('END')", Limits(max_output_chars=50))
    assert len(tail.output) == 50 and tail.output.endswith("END\n")


# --- item 3: files ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["open", "fileio", "sqlite", "posix", "rename", "remove"])
def test_host_files_are_invisible_and_unchangeable(host: Path, how: str) -> None:
    secret, sentinel, new = host / "token", host / "sentinel.txt", host / f"new-{uuid.uuid4().hex}"
    attack = {
        "open": f"print(open({str(secret)!r}).read())\nopen({str(new)!r}, 'w').write('x')",
        "fileio": f"b = __import__('sys').stdout.buffer\nFileIO = type(getattr(b, 'raw', b))\nprint(FileIO({str(secret)!r}).read())\n"
                  f"FileIO({str(sentinel)!r}, 'w').write(b'x')",
        "sqlite": f"import sqlite3\nsqlite3.connect({str(new)!r}).execute('create table t (x)')",
        "posix": f"import sys\ndel sys.modules['posix']\nimport posix\nfd = posix.open({str(new)!r}, posix.O_CREAT | "
                 f"posix.O_WRONLY)\nposix.write(fd, b'x')",
        "rename": f"import os\nos.rename({str(sentinel)!r}, {str(new)!r})",
        "remove": f"import shutil\nshutil.rmtree({str(host)!r})",
    }[how]
    result = run_program(attack, FAST)
    assert result.status == "exited" and result.returncode != 0, result
    assert "hunter2" not in result.output
    assert "FileNotFoundError" in result.output or "OperationalError" in result.output, result.output


def test_the_visible_system_is_read_only_and_the_work_dir_private() -> None:
    import sys

    target = Path(sys.base_prefix) / f"fedlora-escape-{uuid.uuid4().hex}"
    for source in (f"open({str(target)!r}, 'w')", f"import sqlite3\nsqlite3.connect({str(target)!r}).execute('create table t (x)')",
                   "open('/usr/fedlora-escape', 'w')"):
        result = run_program(source, FAST)
        assert result.returncode != 0 and ("Read-only file system" in result.output or "unable to open" in result.output), result
    assert not target.exists() and not Path("/usr/fedlora-escape").exists()
    marker = f"fedlora-{uuid.uuid4().hex}"  # written to the program's own /tmp: never the host's
    print_dir = run_program(f"import os\nopen('/tmp/{marker}', 'w').write('x')\nprint(os.getcwd(), sorted(os.listdir('/')))", FAST)
    assert _exited(print_dir).split(" ", 1)[0] == "/tmp"
    assert not Path(f"/tmp/{marker}").exists()
    assert "home" not in print_dir.output and "work" not in print_dir.output and "etc" not in print_dir.output


def test_unprivileged_uid_without_capabilities_or_caller_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLORA_SECRET", "hunter2")
    source = ("import os, ctypes\nstatus = open('/proc/self/status').read()\n"
              "cap = [l.split()[1] for l in status.splitlines() if l.startswith('CapEff')][0]\n"
              "print(os.getuid(), os.getgid(), cap, sorted(os.environ), 'hunter2' in str(os.environ))\n"
              "print(ctypes.CDLL(None, use_errno=True).unshare(0x10000000))")  # CLONE_NEWUSER: refused
    lines = _exited(run_program(source, FAST)).splitlines()
    assert lines[0] == "65534 65534 0000000000000000 ['HOME', 'LANG', 'PATH', 'PWD', 'TMPDIR'] False"
    assert lines[1] == "-1"


# --- item 4: sockets and network -----------------------------------------------------------------------------------
def test_host_sockets_and_network_are_unreachable(tmp_path: Path) -> None:
    path_socket, abstract = str(tmp_path / "host.sock"), f"\0fedlora-{uuid.uuid4().hex}"
    servers = [socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX), socket.socket()]
    servers[0].bind(path_socket)
    servers[1].bind(abstract)
    servers[2].bind(("127.0.0.1", 0))
    port = servers[2].getsockname()[1]
    accepted: list[object] = []

    def accept(server: socket.socket) -> None:
        try:
            accepted.append(server.accept())
        except OSError:
            pass

    for server in servers:
        server.listen(4)
        server.settimeout(1.0)
    try:
        for target in (f"socket.socket(socket.AF_UNIX).connect({path_socket!r})",
                       f"socket.socket(socket.AF_UNIX).connect({abstract!r})",
                       f"socket.create_connection(('127.0.0.1', {port}), timeout=1)",
                       "socket.create_connection(('1.1.1.1', 53), timeout=1)"):
            result = run_program(f"import socket\n{target}", FAST)
            assert result.returncode != 0 and ("Error" in result.output), (target, result)
        assert _exited(run_program("import socket\nprint([n for _, n in socket.if_nameindex()])", FAST)).strip() == "['lo']"
        threads = [threading.Thread(target=accept, args=(s,)) for s in servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert accepted == []
    finally:
        for server in servers:
            server.close()


# --- item 5: nothing outlives its run --------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["setsid", "double-fork", "ctypes-setsid"])
def test_escaping_the_session_does_not_escape_the_kill(how: str) -> None:
    marker = f"{uuid.uuid4().int % 10**6}.{uuid.uuid4().int % 10**6}"  # a unique sleep argument
    detach = {"setsid": "os.setsid()", "double-fork": "os.setsid()\nif os.fork():\n    os._exit(0)",
              "ctypes-setsid": "import ctypes\nctypes.CDLL(None).setsid()"}[how]
    source = ("import os\nif os.fork() == 0:\n" + "".join(f"    {line}\n" for line in detach.splitlines())
              + f"    os.execv('/bin/sleep', ['sleep', '{marker}'])\nimport time\ntime.sleep(0.5)\n")
    result = run_program(source, FAST)
    assert result.status == "exited", result
    assert _alive_with(marker) == []


# --- item 6: whole-program bounds -------------------------------------------------------------------------------------
def test_process_count_is_bounded_for_the_whole_program_even_as_root() -> None:
    marker = f"{uuid.uuid4().int % 10**6}.{uuid.uuid4().int % 10**6}"
    source = ("import os\nstarted = 0\nfor _ in range(40):\n    try:\n        pid = os.fork()\n    except OSError:\n"
              f"        break\n    if pid == 0:\n        os.execv('/bin/sleep', ['sleep', '{marker}'])\n    started += 1\n"
              "print(started, flush=True)\n")
    result = run_program(source, Limits(timeout_s=10.0, max_processes=16))
    started = int(_exited(result).split()[0])
    assert 0 < started <= 16, result  # root on the host: RLIMIT_NPROC would not bind, the cgroup does
    assert _alive_with(marker) == []


def test_memory_is_bounded_for_the_whole_program() -> None:
    # Four children each hold 200 MB at once; the program may hold 512 MB in all, so at most two can succeed
    # (under per-process limits alone all four would).
    source = ("import os, time\nkids = []\nfor _ in range(4):\n    pid = os.fork()\n    if pid == 0:\n"
              "        try:\n            block = bytearray(200 << 20)\n            block[::4096] = b'x' * len(block[::4096])\n"
              "            time.sleep(2)\n            os._exit(0)\n        except MemoryError:\n            os._exit(1)\n"
              "    kids.append(pid)\nprint(sum(os.waitpid(k, 0)[1] == 0 for k in kids), flush=True)\n")
    result = run_program(source, Limits(timeout_s=30.0, memory_mb=512))
    assert result.status == "exited", result
    assert int(result.output.split()[-1]) <= 2, result.output


@pytest.mark.parametrize("source", ["x = bytearray(10**10)", "x = []\nwhile True:\n    x.append(bytearray(10**7))"])
def test_memory_bomb_ends_the_program(source: str) -> None:
    result = run_program(source, Limits(timeout_s=20.0, memory_mb=256))
    assert result.status in ("exited", "killed") and result.returncode != 0, result


def test_fork_bomb_is_contained_and_cleaned_up() -> None:
    marker = f"{uuid.uuid4().int % 10**6}.{uuid.uuid4().int % 10**6}"
    source = f"import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
    result = run_program(source, Limits(timeout_s=2.0))
    assert result.status in ("timeout", "exited", "killed"), result
    assert _alive_with(marker) == []
