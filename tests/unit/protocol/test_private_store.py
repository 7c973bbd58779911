"""FedSA-LoRA's private factors on disk (fedlora.protocol.private_store): one file per client, committed by the
checkpoint, refused when edited, and nothing a crashed round wrote survives a resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedlora.aggregation import LoraPair
from fedlora.protocol.checkpoint import ServerState, load_state, save_state
from fedlora.protocol.private_store import PrivateStore, PrivateStoreError


def factors(value: float) -> dict[str, torch.Tensor]:
    return {"layer.0.query": torch.full((6, 2), value), "layer.0.value": torch.full((6, 2), -value)}  # (d, r)


def state(tmp_path: Path, round_: int, store: PrivateStore) -> ServerState:
    adapter = {"layer.0.query": LoraPair(A=torch.zeros(2, 5), B=torch.zeros(6, 2))}
    return ServerState(round=round_, adapter=adapter, head={}, history=[{"round": r} for r in range(1, round_ + 1)],
                       private=store)


def test_each_client_is_one_file_and_only_the_index_is_in_the_checkpoint(tmp_path):
    store = PrivateStore(tmp_path / "private")
    for u in range(3):
        store.put(f"client-{u}", factors(u + 1.0), round_=1)
    save_state(state(tmp_path, 1, store), tmp_path)
    store.commit()
    assert sorted(p.name for p in (tmp_path / "private").iterdir()) == [f"client-{u}.r1.safetensors" for u in range(3)]
    back = load_state(tmp_path)
    assert len(back.private) == 3 and "client-1" in back.private and "client-9" not in back.private
    torch.testing.assert_close(back.private.get("client-2"), factors(3.0), rtol=0, atol=0)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "checkpoint.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if k.startswith("localB/")]  # no client's B in the checkpoint itself


def test_a_new_round_replaces_a_clients_file_only_after_its_checkpoint(tmp_path):
    store = PrivateStore(tmp_path / "private")
    store.put("client-0", factors(1.0), round_=1)
    save_state(state(tmp_path, 1, store), tmp_path)
    store.commit()
    store.put("client-0", factors(2.0), round_=2)
    assert {p.name for p in (tmp_path / "private").iterdir()} == {"client-0.r1.safetensors", "client-0.r2.safetensors"}
    save_state(state(tmp_path, 2, store), tmp_path)
    store.commit()
    assert [p.name for p in (tmp_path / "private").iterdir()] == ["client-0.r2.safetensors"]
    torch.testing.assert_close(load_state(tmp_path).private.get("client-0"), factors(2.0), rtol=0, atol=0)


def test_a_crash_before_the_checkpoint_leaves_the_checkpoints_factors_and_cleans_the_rest(tmp_path):
    store = PrivateStore(tmp_path / "private")
    store.put("client-0", factors(1.0), round_=1)
    save_state(state(tmp_path, 1, store), tmp_path)
    store.commit()
    store.put("client-0", factors(2.0), round_=2)  # round 2 trains...
    store.put("client-1", factors(3.0), round_=2)
    # ...and crashes before its checkpoint: the resumed run sees round 1's world
    resumed = load_state(tmp_path).private
    resumed.clean()
    torch.testing.assert_close(resumed.get("client-0"), factors(1.0), rtol=0, atol=0)
    assert "client-1" not in resumed and resumed.get("client-1") is None
    assert [p.name for p in (tmp_path / "private").iterdir()] == ["client-0.r1.safetensors"]


@pytest.mark.parametrize("damage", ["edit", "delete", "swap"])
def test_an_edited_missing_or_swapped_file_is_refused_not_trained_from(tmp_path, damage):
    store = PrivateStore(tmp_path / "private")
    store.put("client-0", factors(1.0), round_=1)
    store.put("client-1", factors(5.0), round_=1)
    save_state(state(tmp_path, 1, store), tmp_path)
    path = tmp_path / "private" / "client-0.r1.safetensors"
    if damage == "edit":
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "delete":
        path.unlink()
    else:  # another client's factors under this client's name
        path.write_bytes((tmp_path / "private" / "client-1.r1.safetensors").read_bytes())
    with pytest.raises(PrivateStoreError, match="client-0" if damage == "delete" else "digest"):
        load_state(tmp_path).private.get("client-0")


def test_a_checkpoint_from_before_the_store_keeps_its_factors_in_memory_until_they_train(tmp_path):
    """An older checkpoint holds each B as tensors (localB/...): still read, and moved to a file on the next put."""
    legacy = PrivateStore(None)
    legacy.put("client-0", factors(1.0), round_=1)  # in memory: saved as localB/ tensors, the old layout
    save_state(state(tmp_path, 1, legacy), tmp_path)
    back = load_state(tmp_path).private
    torch.testing.assert_close(back.get("client-0"), factors(1.0), rtol=0, atol=0)
    back.put("client-0", factors(2.0), round_=2)
    assert back.legacy == {} and (tmp_path / "private" / "client-0.r2.safetensors").is_file()


def test_a_client_id_that_is_not_a_plain_name_cannot_write_outside_the_folder(tmp_path):
    with pytest.raises(ValueError, match="cannot name a file"):
        PrivateStore(tmp_path / "private").put("../../etc/x", factors(1.0), round_=1)
