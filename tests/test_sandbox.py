"""fedlora.sandbox: hostile programs are contained, scored as failures, and leave the caller untouched."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedlora.sandbox import ExecResult, Limits, network_isolation, run_program, run_programs

FAST = Limits(timeout_s=2.0, cpu_s=2, memory_mb=512)


def _processes_with_home(home: str, wait_s: float = 5.0) -> list[int]:
    """Pids of processes whose environment has HOME=<home> (the sandbox's working directory) still alive after
    up to ``wait_s``: SIGKILL is delivered asynchronously, so the group may take a few ms to disappear."""
    deadline = time.monotonic() + wait_s
    while (found := _scan(home)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def _scan(home: str) -> list[int]:
    found = []
    needle = f"HOME={home}".encode() + b"\0"
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.fixture
def parent_unaffected(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A sentinel file outside any sandbox; afterwards the parent's cwd, env, sentinel and sandbox still work."""
    sentinel = tmp_path_factory.mktemp("outside") / "sentinel.txt"
    sentinel.write_text("keep me")
    cwd, env = os.getcwd(), {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    yield sentinel
    assert os.getcwd() == cwd
    assert {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"} == env
    assert sentinel.read_text() == "keep me"
    assert run_program("assert 1 + 1 == 2", FAST).passed


def _failed(result: ExecResult, *statuses: str) -> None:
    assert not result.passed, result
    assert result.status in statuses, result


def test_passing_failing_and_syntax_error() -> None:
    ok = run_program("assert 1 + 1 == 2", FAST)
    assert ok.passed and ok.status == "passed" and ok.returncode == 0
    bad = run_program("print('before')\nassert 1 + 1 == 3", FAST)
    _failed(bad, "failed")
    assert "AssertionError" in bad.output and "before" in bad.output
    syntax = run_program("def f(:\n    pass", FAST)
    _failed(syntax, "failed")
    assert "SyntaxError" in syntax.output
    assert run_program("import sys\nsys.exit(3)", FAST).returncode == 3


def test_infinite_loop_times_out(parent_unaffected: Path) -> None:
    result = run_program("while True:\n    pass", FAST)
    _failed(result, "timeout")
    assert result.seconds < 10


def test_sleeping_program_times_out_on_wall_clock(parent_unaffected: Path) -> None:
    result = run_program("import time\ntime.sleep(60)", Limits(timeout_s=1.0))
    _failed(result, "timeout")
    assert result.seconds < 10


@pytest.mark.parametrize("source", ["x = bytearray(10**10)", "x = []\nwhile True:\n    x.append(bytearray(10**7))"])
def test_memory_bomb(parent_unaffected: Path, source: str) -> None:
    # A generous wall clock: filling 256 MB can take seconds on a loaded machine; it must end on the memory limit.
    _failed(run_program(source, Limits(timeout_s=20.0, memory_mb=256)), "failed", "killed")


def test_fork_bomb_leaves_no_process(parent_unaffected: Path) -> None:
    source = "import os\nprint(os.environ['HOME'], flush=True)\nwhile True:\n    os.fork()"
    result = run_program(source, FAST)
    _failed(result, "failed", "timeout")
    assert _processes_with_home(result.output.splitlines()[0]) == []


def test_ctypes_fork_past_the_python_guard_is_killed_with_the_group(parent_unaffected: Path) -> None:
    # A bounded "bomb" (40 sleepers) that bypasses the Python-level fork guard: the kernel layers must clean up.
    source = (
        "import ctypes, os, time\nprint(os.environ['HOME'], flush=True)\nlibc = ctypes.CDLL(None)\n"
        "for _ in range(40):\n    if libc.fork() == 0:\n        time.sleep(60)\n        os._exit(0)\ntime.sleep(60)\n"
    )
    result = run_program(source, Limits(timeout_s=1.5))
    _failed(result, "timeout")
    assert _processes_with_home(result.output.splitlines()[0]) == []


def test_writing_outside_the_working_directory(parent_unaffected: Path) -> None:
    escape = Path(f"/tmp/fedlora_escape_{uuid.uuid4().hex}.txt")
    for source in (
        f"open({str(escape)!r}, 'w').write('x')",
        f"import pathlib\npathlib.Path({str(escape)!r}).write_text('x')",
        f"import os\nos.close(os.open({str(escape)!r}, os.O_WRONLY | os.O_CREAT))",
        f"import os\nos.symlink({str(escape)!r}, 'link')\nopen('link', 'w').write('x')",
    ):
        _failed(run_program(source, FAST), "failed")
        assert not escape.exists()
    sentinel = str(parent_unaffected)
    for source in (f"import os\nos.remove({sentinel!r})", f"import shutil\nshutil.rmtree({str(parent_unaffected.parent)!r})",
                   f"import os\nos.rename({sentinel!r}, 'stolen')", f"open({sentinel!r}, 'a').write('x')"):
        _failed(run_program(source, FAST), "failed")
        assert parent_unaffected.read_text() == "keep me"
    inside = "import os, shutil, tempfile\nos.makedirs('a/b')\nopen('a/b/c', 'w').write('x')\nshutil.rmtree('a')\n"
    inside += "with tempfile.NamedTemporaryFile('w') as f:\n    f.write('ok')\nprint(open('/dev/null', 'w') and os.listdir())"
    result = run_program(inside, FAST)
    assert result.passed, result
    assert result.output.strip() == "['program.py']"


def test_network_is_unreachable(parent_unaffected: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    connections: list[object] = []

    def accept() -> None:
        try:
            connections.append(listener.accept())
        except OSError:
            pass

    try:
        for source in (
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
            f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)",
        ):
            _failed(run_program(source, FAST), "failed")
        thread = threading.Thread(target=accept)
        thread.start()
        thread.join()
        assert connections == []
    finally:
        listener.close()


def test_network_isolation_layer_reported() -> None:
    layer = network_isolation()
    assert layer in ("namespace", "python-level")
    if layer == "namespace":  # the kernel layer on its own: only a (down) loopback interface exists
        result = run_program("import socket\nprint([name for _, name in socket.if_nameindex()])", FAST)
        assert result.passed and result.output.strip() == "['lo']", result


def test_caller_environment_is_not_inherited(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLORA_SECRET", "hunter2")
    result = run_program("import os\nprint(os.environ['FEDLORA_SECRET'])", FAST)
    _failed(result, "failed")
    assert "hunter2" not in result.output
    env = run_program("import os\nprint(sorted(os.environ))", FAST)
    assert env.output.strip() == "['HOME', 'LANG', 'PATH', 'TMPDIR']"


def test_output_is_truncated_to_its_tail() -> None:
    result = run_program("print('a' * 100000)\nprint('END')", Limits(max_output_chars=50))
    assert result.passed and len(result.output) == 50 and result.output.endswith("END\n")


def test_run_programs_keeps_order_and_runs_concurrently() -> None:
    sources = [f"import time\ntime.sleep(0.5)\nprint({i})" for i in range(8)]
    sources[3] = "assert False"
    results = run_programs(sources, FAST, workers=4)
    assert [r.passed for r in results] == [i != 3 for i in range(8)]
    assert [r.output.strip() for i, r in enumerate(results) if i != 3] == [str(i) for i in range(8) if i != 3]
    assert run_programs([], FAST) == []
