"""The kernel boundary around generated code: bubblewrap namespaces plus a cgroup (see :mod:`.cgroups`).

What a sandboxed program gets (``bwrap`` from the bubblewrap package, Debian/Ubuntu ``apt-get install
bubblewrap``, Fedora ``dnf install bubblewrap``):

* new user, mount, PID, network, IPC, UTS and cgroup namespaces; inside, uid/gid 65534 with no capabilities, and
  no further user namespaces;
* a filesystem of its own: ``/usr`` (and the ``/bin``, ``/lib*`` links), the Python installation and this folder
  read-only; a fresh ``/proc`` and minimal ``/dev``; a private, size-bounded tmpfs at ``/tmp`` as its only
  writable place. Nothing else of the host exists there: not the caller's home, checkpoints or tokens, not
  ``/run`` or ``/var`` (so no host Unix-domain socket), and the empty network namespace has no interface up
  (no TCP/UDP, not even to 127.0.0.1, and no abstract Unix sockets of the host);
* a new session (no terminal to inject keystrokes into); it dies when its parent dies;
* a cgroup bounding processes+threads and memory of the whole program, which is how everything it started is
  killed at the end.

:func:`problem` says, once per process, whether this machine can set all of that up; when it cannot, generated
code is refused unless the caller explicitly accepts the risk (``--allow-unsandboxed-code``).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

from fedlora.sandbox.cgroups import Cgroup, CgroupUnavailable

HERE = Path(__file__).resolve().parent
INSIDE = "/opt/fedlora-sandbox"  # where this folder appears inside the sandbox (read-only)
SANDBOX_UID = 65534  # "nobody"
INSTALL_HINT = "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap)"


def interpreter() -> str:
    """The real interpreter behind ``sys.executable`` (a venv's ``python`` is a link into the installation)."""
    return os.path.realpath(sys.executable)


def _system_binds() -> list[str]:
    """Read-only binds for the system folders, keeping merged-/usr symlinks as symlinks."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    prefixes = {os.path.realpath(sys.base_prefix), os.path.dirname(os.path.dirname(interpreter()))}
    for prefix in sorted(prefixes):
        if prefix != "/usr" and not prefix.startswith("/usr/"):
            args += ["--ro-bind", prefix, prefix]
    return args


def bwrap_command(inner: list[str], tmp_bytes: int) -> list[str]:
    """The ``bwrap`` command line that runs ``inner`` inside the boundary (paths in ``inner`` as seen inside)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise FileNotFoundError(f"bwrap not found: {INSTALL_HINT}")
    return [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
            "--hostname", "sandbox", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            *_system_binds(), "--ro-bind", str(HERE), INSIDE, "--proc", "/proc", "--dev", "/dev",
            "--size", str(tmp_bytes), "--perms", "0700", "--tmpfs", "/tmp", "--chdir", "/tmp",
            "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
            "--setenv", "TMPDIR", "/tmp", "--setenv", "LANG", "C.UTF-8", "--", *inner]


_PROBE = ("import os, socket\n"
          "assert os.getuid() == 65534, os.getuid()\n"
          "try:\n    socket.create_connection(('127.0.0.1', 9), timeout=1); print('net')\n"
          "except OSError:\n    print('ok')\n")


@functools.lru_cache(maxsize=1)
def problem() -> str | None:
    """None when the full boundary works on this machine, else one sentence saying what is missing.

    Probed once per process with a real run: bwrap present and able to create the namespaces, a cgroup with the
    pids and memory controllers writable, and the probe inside seeing no network."""
    if shutil.which("bwrap") is None:
        return f"bubblewrap (bwrap) is not installed: {INSTALL_HINT}"
    try:
        Cgroup.create(8, 64 << 20).remove()
    except CgroupUnavailable as exc:
        return f"no cgroup can bound the program's processes and memory ({exc}); run as root or in a delegated cgroup"
    command = bwrap_command([interpreter(), "-I", "-S", "-B", "-c", _PROBE], 1 << 20)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env={})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap could not start ({exc})"
    if done.returncode != 0 or done.stdout.strip() != "ok":
        detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return (f"bubblewrap cannot set up the sandbox here ({detail}); user namespaces may be disabled "
                "(sysctl kernel.unprivileged_userns_clone / user.max_user_namespaces, or an AppArmor policy)")
    return None
