"""Attacks on the client's pins of result signing keys (hosts.json "keys"): races, other writers, wrong types."""


from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from securecc import attest
from securecc import protocol as wire
from securecc.testing import GCC_IDENTITY

ALICE, PEER, SERVER = "alice@TEST.REALM", "127.0.0.1:40000", "securecc/localhost@TEST.REALM"
OBJECT, EVIL = b"\x7fELF object", b"\x7fELF evil"


def job(source: bytes = b"int a;\n") -> wire.Job:
    return wire.Job("gcc", ["-O2"], "c", "-c", "/src", "a.c", source, compiler_identity=GCC_IDENTITY)


# --- the client's pins ---------------------------------------------------------------------------------


def test_parallel_first_meetings_pin_one_key(tmp_path: Path) -> None:
    """Jobs in parallel, each with its own state read before any pinned, meet two keys for one principal: one wins."""
    from securecc.client.hosts import HostState

    path = str(tmp_path / "hosts.json")
    keys = [attest.public_key(Ed25519PrivateKey.generate()) for _ in range(8)]
    states = [HostState(path) for _ in keys]
    answers: list[bool] = [False] * len(keys)
    gate = threading.Barrier(len(keys))

    def meet(i: int) -> None:
        gate.wait()
        answers[i] = states[i].pin(SERVER, keys[i])

    threads = [threading.Thread(target=meet, args=(i,)) for i in range(len(keys))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers.count(True) == 1
    winner = keys[answers.index(True)]
    assert json.loads(Path(path).read_text())["keys"] == {SERVER: winner}
    assert HostState(path).pin(SERVER, winner) and not HostState(path).pin(SERVER, keys[answers.index(False)])


def test_a_pin_survives_other_writers_of_the_state_file(tmp_path: Path) -> None:
    from securecc.client.hosts import Host, HostState

    path = str(tmp_path / "hosts.json")
    key, other = (attest.public_key(Ed25519PrivateKey.generate()) for _ in range(2))
    stale = HostState(path)  # read before the pin: its later saves must not drop it
    assert HostState(path).pin(SERVER, key)
    stale.failed(Host("build1", 3632), "down")
    stale.succeeded(Host("build1", 3632), 0.1)
    stale.remember_srv("_securecc._tcp", [], 60)
    assert not HostState(path).pin(SERVER, other)


@pytest.mark.parametrize("pinned", [123, ["k"], {"k": 1}, ""], ids=["int", "list", "dict", "empty"])
def test_a_pin_of_the_wrong_type_matches_no_key(tmp_path: Path, pinned: Any) -> None:
    from securecc.client.hosts import HostState

    path = tmp_path / "hosts.json"
    path.write_text(json.dumps({"hosts": {}, "keys": {SERVER: pinned}}))
    key = attest.public_key(Ed25519PrivateKey.generate())
    assert not HostState(str(path)).pin(SERVER, key)
    assert json.loads(path.read_text())["keys"][SERVER] == pinned  # nothing overwrote it


def test_a_malformed_hosts_entry_does_not_wipe_the_pins(tmp_path: Path) -> None:
    """Another writer left "hosts" of the wrong type: the next save starts the hosts afresh, not the pins."""
    from securecc.client.hosts import Host, HostState

    path = tmp_path / "hosts.json"
    key, other = (attest.public_key(Ed25519PrivateKey.generate()) for _ in range(2))
    path.write_text(json.dumps({"hosts": [], "keys": {SERVER: key}}))
    HostState(str(path)).failed(Host("build1", 3632), "down")
    assert not HostState(str(path)).pin(SERVER, other)


def test_a_malformed_hosts_entry_is_read_as_no_hosts_with_the_pins_kept(tmp_path: Path) -> None:
    from securecc.client.hosts import Host, HostState

    path = tmp_path / "hosts.json"
    key = attest.public_key(Ed25519PrivateKey.generate())
    path.write_text(json.dumps({"hosts": ["x"], "keys": {SERVER: key}}))
    state = HostState(str(path))
    assert state.backed_off(Host("build1", 3632)) == 0 and state.pin(SERVER, key)
