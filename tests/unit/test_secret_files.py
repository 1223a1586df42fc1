"""The server's secrets (keytab, audit key, result signing key) out of the job handler's reach, checked at start."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from securecc.audit import generate_key
from securecc.server.config import ConfigError
from securecc.server.main import _check_private

HANDLER_UID = 65534


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_a_secret_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    key = tmp_path / "signing.key"
    generate_key(key)
    os.chmod(key, mode)
    with pytest.raises(ConfigError, match="open to other users"):
        _check_private(key, HANDLER_UID)


def test_a_private_secret_of_the_servers_own_is_taken(tmp_path: Path) -> None:
    key = tmp_path / "signing.key"
    generate_key(key)
    os.chmod(key, 0o600)
    _check_private(key, HANDLER_UID)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to the handler's uid needs root")
def test_a_private_secret_owned_by_the_job_handlers_uid_is_refused(tmp_path: Path) -> None:
    """Mode 0600 keeps others out, not its owner: a signing key owned by the handler's uid is the handler's."""
    key = tmp_path / "signing.key"
    generate_key(key)
    os.chmod(key, 0o600)
    os.chown(key, HANDLER_UID, HANDLER_UID)
    with pytest.raises(ConfigError, match="job handler"):
        _check_private(key, HANDLER_UID)
