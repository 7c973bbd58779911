"""SuperNode authentication on a loopback TLS SuperLink (`--enable-supernode-auth`, Flower 1.42).

Only SuperNodes whose public key was registered with `flwr supernode register` may connect: a
SuperNode with an unregistered key and one without a key are refused (they exit with Flower's
connection error and never become nodes of the SuperLink), while the registered ones come online;
a second SuperNode with a registered key already online is refused as well.
No model or data is needed (no run is submitted); the training run over TLS + authentication is
`test_flower_deployment.py`. Every process is started in its own session and ended (with its children) in `finally`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlora.engines.flower.local import (
    Processes,
    flower_env,
    free_port,
    generate_certificates,
    generate_supernode_keys,
    list_supernodes,
    register_supernode,
    superlink_command,
    supernode_command,
    wait_for,
    write_connection,
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


@pytest.mark.slow
def test_only_registered_supernodes_connect(tmp_path: Path):
    certs = generate_certificates(tmp_path / "certs")
    keys = generate_supernode_keys(tmp_path / "keys", ["supernode-0", "supernode-1", "intruder"])
    port = free_port()
    superlink = f"127.0.0.1:{port}"
    write_connection(tmp_path / "flwr-home", "loopback", superlink, root_certificates=certs["ca"])
    env = flower_env(tmp_path / "flwr-home")
    procs = Processes(tmp_path / "logs", env)
    try:
        procs.start("superlink", superlink_command(port, certs, supernode_auth=True))
        wait_for(lambda: "Uvicorn running" in procs.log("superlink"), 60, "the SuperLink to listen")
        registered = {name: register_supernode(keys[name]["public"], "loopback", env)
                      for name in ("supernode-0", "supernode-1")}
        assert len(set(registered.values())) == 2
        nodes = list_supernodes("loopback", env)
        assert {int(n["node-id"]): n["status"] for n in nodes} == {i: "registered" for i in registered.values()}

        procs.start("intruder", supernode_command(superlink, certs["ca"], 0, 2, keys["intruder"]["private"]))
        procs.start("keyless", supernode_command(superlink, certs["ca"], 1, 2))
        for i, name in enumerate(registered):
            procs.start(name, supernode_command(superlink, certs["ca"], i, 2, keys[name]["private"]))

        exited(procs, ["intruder", "keyless"])
        for name, reason in (("intruder", NOT_ACTIVATED), ("keyless", SELF_REGISTRATION_DISABLED)):
            log = procs.log(name)
            assert procs.procs[name].returncode == 1, log[-3000:]
            assert CONNECTION_REFUSED in log and reason in log, log[-3000:]
            assert "SuperNode ID:" not in log  # never got a node id

        def online() -> dict[int, str]:
            return {int(n["node-id"]): n["status"] for n in list_supernodes("loopback", env)}

        wait_for(lambda: set(online().values()) == {"online"}, 120, "the registered SuperNodes to come online",
                 interval=2)
        assert online() == {i: "online" for i in registered.values()}  # the refused ones never became nodes
        for name, node_id in registered.items():
            assert procs.procs[name].poll() is None, procs.log(name)[-3000:]
            assert f"SuperNode ID: {node_id}" in procs.log(name)

        # one key, one node: a copy of supernode-0's key cannot join while supernode-0 is online
        procs.start("impostor", supernode_command(superlink, certs["ca"], 0, 2, keys["supernode-0"]["private"]))
        exited(procs, ["impostor"])
        log = procs.log("impostor")
        assert procs.procs["impostor"].returncode == 1 and NOT_ACTIVATED in log, log[-3000:]
        assert online() == {i: "online" for i in registered.values()}
    finally:
        procs.stop_all()


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

