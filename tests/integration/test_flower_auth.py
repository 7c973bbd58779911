"""SuperNode authentication (`--enable-supernode-auth`, Flower 1.42): the key files, and what a refusal looks like.

The refusals themselves run against a real TLS SuperLink inside `test_flower_deployment.py` (while it waits out a
killed SuperNode's heartbeats, so they cost no extra SuperLink): a SuperNode with an unregistered key, one without a
key, and a copy of a registered key whose node is online all exit with Flower's connection error and never become
nodes. This module holds the messages those checks look for and the fast checks of the key files.
"""

from __future__ import annotations

from pathlib import Path


from fedlora.engines.flower.local import (
    Processes,
    generate_supernode_keys,
    wait_for,
)

# Flower 1.42: flwr_exit(SUPERNODE_CONNECTION_ERROR) with the SuperLink's error code
CONNECTION_REFUSED = "Exit Code: 305\nFailed to initialize the connection to the SuperLink"
NOT_ACTIVATED = "[code: 2004] Failed to activate SuperNode"  # key unknown (or its node already online)
SELF_REGISTRATION_DISABLED = "[code: 2001] SuperNode authentication is enabled"  # no key at all


def exited(procs: Processes, names: list[str], timeout: float = 120) -> None:
    try:
        wait_for(lambda: all(procs.procs[n].poll() is not None for n in names), timeout, f"{names} to exit")
    except TimeoutError as err:
        raise AssertionError("\n".join(f"--- {n}:\n{procs.log(n)[-2000:]}" for n in names)) from err


def test_supernode_keys_are_openssh_ec_keys(tmp_path: Path):
    """The files `flwr supernode register` and `flower-supernode --auth-supernode-private-key` read."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    keys = generate_supernode_keys(tmp_path, ["a", "b"])
    assert set(keys) == {"a", "b"}
    for pair in keys.values():
        private = load_ssh_private_key(pair["private"].read_bytes(), None)
        public = load_ssh_public_key(pair["public"].read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert private.public_key().public_numbers() == public.public_numbers()
        assert pair["private"].stat().st_mode & 0o077 == 0
        assert pair["public"].read_text().startswith("ecdsa-sha2-nistp384 ")
    assert keys["a"]["public"].read_bytes() != keys["b"]["public"].read_bytes()

