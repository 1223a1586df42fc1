"""securecc doctor's pure parts: reading klist, its lines, the agent directory rule."""

from __future__ import annotations

import os

from securecc.client.doctor import FAIL, OK, Check, agent_check, renewal

KLIST = """Ticket cache: FILE:/tmp/krb5cc_1000
Default principal: alice@TEST.REALM

Valid starting       Expires              Service principal
12/04/2026 02:00:00  12/04/2026 12:00:00  krbtgt/TEST.REALM@TEST.REALM
\trenew until 12/11/2026 02:00:00, Flags: FRIA
12/04/2026 02:01:00  12/04/2026 12:00:00  securecc/build1@TEST.REALM
\tFlags: FAT
"""


def test_renewal_is_read_from_the_ticket_granting_ticket():
    assert renewal(KLIST) == "renewable until 12/11/2026 02:00:00"
    assert renewal(KLIST.replace("\trenew until 12/11/2026 02:00:00, Flags: FRIA", "\tFlags: FIA")) == "not renewable"
    assert renewal("klist: No credentials cache found (filename: /tmp/x)\n") is None


def test_a_line_says_what_and_the_fix():
    assert Check(FAIL, "agent directory", "open to others", "chmod 700 d").line() == (
        "FAIL  agent directory: open to others; fix: chmod 700 d")
    assert Check(OK, "hosts", "2 from SECURECC_HOSTS").line() == "OK    hosts: 2 from SECURECC_HOSTS"


def test_the_agent_directory_must_be_the_users_alone(tmp_path):
    directory = tmp_path / "agents"
    assert agent_check({"SECURECC_AGENT_DIR": str(directory)}).status == OK  # made 0700 by the first compile
    directory.mkdir()
    os.chmod(directory, 0o700)
    assert agent_check({"SECURECC_AGENT_DIR": str(directory)}).status == OK
    os.chmod(directory, 0o750)
    assert agent_check({"SECURECC_AGENT_DIR": str(directory)}).status == FAIL
    link = tmp_path / "link"
    link.symlink_to(directory)
    assert agent_check({"SECURECC_AGENT_DIR": str(link)}).status == FAIL  # a link is not a directory of ours
    assert agent_check({"SECURECC_AGENT": "off"}).status == OK
