"""The compile-server list, in the spirit of ``DISTCC_HOSTS``.

``SECURECC_HOSTS`` is a whitespace-separated list of ``host[:port][/limit][,option...]``.
``localhost`` (without a port) means "compile here".  Options:
``principal=NAME`` names the server's Kerberos principal when it is not
``securecc/<host>`` in the host's realm (e.g. a server reached by address).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_PORT = 3637
DEFAULT_LIMIT = 4


class HostsError(ValueError):
    """A host specification that cannot be understood."""


@dataclass(frozen=True)
class Host:
    name: str
    port: int = DEFAULT_PORT
    limit: int = DEFAULT_LIMIT
    principal: str | None = None

    @property
    def is_local(self) -> bool:
        return self.name == "localhost" and self.port == 0

    @property
    def target(self) -> str:
        """The GSS target: an explicit principal, or the host-based service name."""
        return self.principal or f"securecc@{self.name}"


def parse_host(spec: str) -> Host:
    head, *options = spec.split(",")
    limit = DEFAULT_LIMIT
    if "/" in head:
        head, _, limit_text = head.partition("/")
        if not limit_text.isdigit() or int(limit_text) < 1:
            raise HostsError(f"bad job limit in {spec!r}")
        limit = int(limit_text)
    if head == "localhost":
        return Host("localhost", 0, limit)
    name, port = head, DEFAULT_PORT
    if head.startswith("["):  # [v6addr]:port
        name, _, rest = head[1:].partition("]")
        if rest:
            port_text = rest.removeprefix(":")
            if not port_text.isdigit():
                raise HostsError(f"bad port in {spec!r}")
            port = int(port_text)
    elif head.count(":") == 1:
        name, _, port_text = head.partition(":")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise HostsError(f"bad port in {spec!r}")
        port = int(port_text)
    if not name:
        raise HostsError(f"no host name in {spec!r}")
    principal = None
    for option in options:
        key, _, value = option.partition("=")
        if key == "principal" and value:
            principal = value
        else:
            raise HostsError(f"unknown host option {option!r} in {spec!r}")
    return Host(name, port, limit, principal)


def parse_hosts(text: str) -> list[Host]:
    """Parse a host list; '#' starts a comment (as in distcc's hosts files)."""
    specs = []
    for line in text.splitlines():
        specs += line.split("#", 1)[0].split()
    return [parse_host(spec) for spec in specs]


def configured_hosts() -> list[Host]:
    """``SECURECC_HOSTS``, else ``~/.config/securecc/hosts``, else ``/etc/securecc/hosts``."""
    text = os.environ.get("SECURECC_HOSTS")
    if text is None:
        for path in (os.path.expanduser("~/.config/securecc/hosts"), "/etc/securecc/hosts"):
            try:
                with open(path) as f:
                    text = f.read()
                break
            except OSError:
                continue
    return parse_hosts(text or "")
