"""Loopback helpers for running the Flower app on one machine: TLS material, SuperNode
authentication keys, the flwr CLI's connection file, the SuperLink/SuperNode command lines, and
processes that are always cleaned up.

Used by the tests and handy for a local deployment rehearsal; a real deployment runs the same
``flower-superlink`` / ``flower-supernode`` commands (docs/flower.md) on separate machines.
Flower 1.42 serves the Fleet, Control and runtime APIs over HTTP(S) on one ``--port``; every
SuperNode also serves a runtime API for its ClientApp on its own ``--port``.

SuperNode authentication in Flower 1.42: ``flower-superlink --enable-supernode-auth`` (TLS
required) refuses SuperNodes that register themselves; each SuperNode's EC public key (OpenSSH
format, a NIST curve) is registered beforehand with ``flwr supernode register <key.pub> <superlink>``
(Control API), and the SuperNode signs every Fleet request with the private key given by
``flower-supernode --auth-supernode-private-key``. A SuperNode whose key is not registered fails
to activate and exits (exit code 305, ``[code: 2004] Failed to activate SuperNode``); one
without a key fails to register and exits (``[code: 2001]``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import psutil
import tomli_w  # Flower's own dependency (flwr writes config.toml with it)

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def generate_certificates(directory: str | Path) -> dict[str, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1/localhost (PEM): ``ca``, ``cert``, ``key``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))])
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(san, critical=False).sign(ca_key, hashes.SHA256()))
    paths = {"ca": directory / "ca.crt", "cert": directory / "server.pem", "key": directory / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


def generate_supernode_keys(directory: str | Path, names: Sequence[str]) -> dict[str, dict[str, Path]]:
    """An EC (NIST P-384) key pair per SuperNode for SuperNode authentication, in OpenSSH format,
    as ``ssh-keygen -t ecdsa -b 384 -N "" -f <directory>/<name>`` writes them: ``<name>`` (private
    key, mode 600, for ``flower-supernode --auth-supernode-private-key``) and ``<name>.pub`` (public
    key, for ``flwr supernode register``). Returns ``{name: {"private": path, "public": path}}``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    keys = {}
    for name in names:
        key = ec.generate_private_key(ec.SECP384R1())
        private, public = directory / name, directory / f"{name}.pub"
        private.touch(mode=0o600)
        private.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
        public.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" {name}\n".encode())
        keys[name] = {"private": private, "public": public}
    return keys


def write_connection(flwr_home: str | Path, name: str, address: str, root_certificates: str | Path | None = None) -> Path:
    """Set the SuperLink connection ``name`` in ``$FLWR_HOME/config.toml`` (what ``flwr run . <name>`` reads).

    Idempotent: the file is parsed, ``[superlink.<name>]`` replaced whole, every other table kept,
    and the file rewritten (atomically), so running it twice leaves one valid table -- appending
    with ``cat >>`` twice leaves a duplicate table, which TOML forbids. ``[superlink] default`` is
    set to ``name`` only where no default exists yet.
    """
    flwr_home = Path(flwr_home).expanduser()
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    config = tomllib.loads(path.read_text()) if path.exists() else {}
    superlink = config.setdefault("superlink", {})
    security: dict[str, str | bool] = ({"root-certificates": str(Path(root_certificates).resolve())}
                                       if root_certificates else {"insecure": True})
    superlink[name] = {"address": address, **security}
    superlink.setdefault("default", name)
    scratch = path.with_name(path.name + ".tmp")
    scratch.write_text(tomli_w.dumps(config))
    os.replace(scratch, path)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m fedlora.engines.flower.local connect NAME ADDRESS [--root-certificates CA]``: see :func:`write_connection`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fedlora.engines.flower.local",
                                     description="Write a SuperLink connection into Flower's config.toml (idempotent).")
    sub = parser.add_subparsers(dest="command", required=True)
    connect = sub.add_parser("connect", help="set [superlink.NAME] in $FLWR_HOME/config.toml (default ~/.flwr)")
    connect.add_argument("name", help="connection name, as in `flwr run . NAME`")
    connect.add_argument("address", help="SuperLink address, e.g. 127.0.0.1:9093")
    connect.add_argument("--root-certificates", help="CA certificate for TLS; without it the connection is insecure")
    args = parser.parse_args(argv)
    home = os.environ.get("FLWR_HOME") or Path.home() / ".flwr"
    print(write_connection(home, args.name, args.address, args.root_certificates))


def flower_env(flwr_home: str | Path) -> dict[str, str]:
    """Environment for every Flower process: offline, no telemetry, no runtime ``uv sync``, own FLWR_HOME."""
    env = dict(os.environ)
    env.update(FLWR_HOME=str(flwr_home), HF_HUB_OFFLINE="1", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_DISABLE_UPDATE_CHECK="1", FLWR_TELEMETRY_ENABLED="0", TOKENIZERS_PARALLELISM="false")
    # The Flower executables live beside this Python; the venv may not be on PATH (CI calls .venv/bin/python).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def superlink_command(port: int, certs: dict[str, Path], supernode_auth: bool = False,
                      host: str = LOOPBACK) -> list[str]:
    """``flower-superlink`` over TLS (``certs`` from :func:`generate_certificates`), optionally
    with SuperNode authentication (only SuperNodes registered with :func:`register_supernode`)."""
    cmd = ["flower-superlink", "--ssl-ca-certfile", str(certs["ca"]), "--ssl-certfile", str(certs["cert"]),
           "--ssl-keyfile", str(certs["key"]), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    return cmd + ["--enable-supernode-auth"] if supernode_auth else cmd


def supernode_command(superlink: str, root_certificates: str | Path, partition_id: int, num_partitions: int,
                      private_key: str | Path | None = None, host: str = LOOPBACK) -> list[str]:
    """``flower-supernode`` for client ``partition_id`` (TLS; its runtime API on a free port), signing
    its requests with ``private_key`` (OpenSSH EC key) when given."""
    cmd = ["flower-supernode", "--root-certificates", str(root_certificates), "--superlink", superlink,
           "--host", host, "--port", str(free_port()),
           "--node-config", f"partition-id={partition_id} num-partitions={num_partitions}"]
    return cmd + ["--auth-supernode-private-key", str(private_key)] if private_key else cmd


def _flwr_json(args: Sequence[str], env: dict[str, str], timeout: float) -> dict:
    """Run ``flwr <args> --format json`` and return its JSON answer (raises with the output on failure)."""
    proc = subprocess.run(["flwr", *args, "--format", "json"], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    out = proc.stdout
    try:
        answer = json.loads(out[out.index("{"):out.rindex("}") + 1])
    except ValueError:
        answer = {}
    if proc.returncode != 0 or not answer.get("success"):
        raise RuntimeError(f"flwr {' '.join(args)} failed (exit {proc.returncode}):\n{out}\n{proc.stderr}")
    return answer


def register_supernode(public_key: str | Path, connection: str, env: dict[str, str], timeout: float = 120) -> int:
    """``flwr supernode register <public_key> <connection>``: authorise one SuperNode; returns its node id."""
    return int(_flwr_json(["supernode", "register", str(public_key), connection], env, timeout)["node-id"])


def list_supernodes(connection: str, env: dict[str, str], timeout: float = 120) -> list[dict]:
    """``flwr supernode list <connection>``: the SuperLink's nodes (``node-id``, ``status``: registered,
    online, offline, ...)."""
    return list(_flwr_json(["supernode", "list", connection], env, timeout)["nodes"])


class Processes:
    """Processes started in their own session (log file each); :meth:`stop_all` ends them and their children."""

    def __init__(self, log_dir: str | Path, env: dict[str, str]) -> None:
        self.log_dir, self.env = Path(log_dir), env
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: Sequence[str], cwd: str | Path | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 -- closed with the process
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=cwd, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self, name: str) -> None:
        """SIGKILL one process and everything it spawned (a crash, not a shutdown)."""
        _end(self.procs[name], signal.SIGKILL, grace=0)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs.values())):
            _end(proc, signal.SIGTERM, grace=10)


def _end(proc: subprocess.Popen, sig: int, grace: float) -> None:
    try:  # children may have left the group (SuperLink detaches its SuperExec): collect them first
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for p in [proc, *family]:
        try:
            os.killpg(p.pid, sig) if p.pid == proc.pid else p.send_signal(sig)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass
    _, alive = psutil.wait_procs([p for p in family if p.is_running()], timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        proc.wait(timeout=grace or 5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


@contextmanager
def simulation_superlink(root: str | Path) -> Iterator[tuple[Processes, dict[str, str]]]:
    """A simulation-mode SuperLink on a free loopback port, with ``flwr`` connection "sim" to it.

    Yields the processes and the environment for ``flwr run <app> sim``; ``root`` holds the Flower
    home, the client data cache and the logs. The SuperLink is stopped on exit, errors included.
    """
    root = Path(root)
    port = free_port()
    write_connection(root / "flwr-home", "sim", f"{LOOPBACK}:{port}")
    env = flower_env(root / "flwr-home") | {"FEDLORA_CACHE_DIR": str(root / "cache")}
    procs = Processes(root / "logs", env)
    try:
        procs.start("superlink", ["flower-superlink", "--insecure", "--simulation", "--host", LOOPBACK, "--port",
                                  str(port), "--disable-runtime-dependency-installation"])
        wait_for(lambda: "Uvicorn running" in procs.log("superlink"), 60, "the SuperLink to listen")
        yield procs, env
    finally:
        procs.stop_all()


if __name__ == "__main__":
    main()
