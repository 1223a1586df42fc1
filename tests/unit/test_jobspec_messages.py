"""What a refusal tells the client of the server's own configuration: nothing beyond the sandbox's fixed layout."""

from __future__ import annotations

import pytest

from securecc import protocol as wire
from securecc.server import jobspec

ROOT = "/opt/gcc-13.2/prefix"  # a compiler root the admin configured: the client has no business learning it


def source_job(**fields: object) -> wire.Job:
    return wire.Job(**{"compiler": "gcc", "args": [], "language": "c-source", "mode": "-c", "cwd": "/build", "source_path": "a.c",
                       "source": b"", "original": b"int a;\n", "system_digest": "0" * 64, **fields})


@pytest.mark.parametrize("fields", [
    {"args": ["-gsplit-dwarf"], "output_path": "/opt/a.o"},  # its output directory would cover the root
    {"include_paths": [f"{ROOT}/include/x.h"], "includes": [b""]},  # a header over the compiler's own
    {"cwd": f"{ROOT}/src"},
])
def test_a_refusal_never_names_a_compiler_root(fields: dict[str, object]) -> None:
    with pytest.raises(jobspec.Invalid) as refused:
        jobspec.validate(source_job(**fields), (ROOT,))
    message = str(refused.value)  # the client's own path may be quoted back; the root itself never is
    assert refused.value.reason == wire.Reason.BAD_PATH and "compiler root of this server" in message
    assert repr(ROOT) not in message and not message.endswith(ROOT), message
