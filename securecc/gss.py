"""GSS-API contexts for both ends, the flags we insist on, and clear errors.

Both sides require mutual authentication, confidentiality, integrity, replay
and sequence detection, and refuse a completed context that lacks any of
them.  Every gssapi exception leaves this module as :class:`GSSFailure`
carrying one sentence a user can act on ("no Kerberos ticket: run kinit").

python-gssapi defers acceptor errors: ``step`` returns the KRB-ERROR token
for the peer and the exception surfaces on the next access.  The acceptor
therefore probes ``complete`` at once, and hands the error token back with
the failure so the server can send it (the client then learns *why*).
"""

from __future__ import annotations

import gssapi
import gssapi.exceptions
import gssapi.raw
from gssapi import RequirementFlag as Flag
from gssapi.raw.misc import GSSError

from securecc.handshake import AuthenticationFailure

REQUIRED_FLAGS = frozenset(
    {
        Flag.mutual_authentication,
        Flag.confidentiality,
        Flag.integrity,
        Flag.replay_detection,
        Flag.out_of_sequence_detection,
    }
)

_KRB5_BASE = 2529638912  # MIT com_err table base for krb5 errors (as unsigned)
_KRB5_MESSAGES = {
    6: "unknown Kerberos principal: run kinit as a user the realm knows",
    7: "the server's principal {target} is unknown to the KDC: check the host name or its principal= option, or ask the admin to create it",
    31: "the server's key does not match the KDC's (keytab out of date): ask the securecc admin to re-extract the keytab",
    32: "Kerberos ticket expired: run kinit",
    34: "the server saw this authentication before (replay): try again",
    35: "the server's key does not match the KDC's (wrong or stale keytab): ask the securecc admin to re-extract the keytab",
    37: "clock skew too great between this machine, the server or the KDC: fix the clocks (NTP)",
    41: "the server's key does not match the KDC's (wrong or stale keytab): ask the securecc admin to re-extract the keytab",
    44: "the server's key version does not match the KDC's: ask the securecc admin to re-extract the keytab",
}
_KDC_UNREACH = -1765328228  # KRB5_KDC_UNREACH: an outage, which the client backs off
_KRB5_NAMED = {
    -1765328189: "no Kerberos ticket: run kinit (or point KRB5_CLIENT_KTNAME at a keytab)",  # KRB5_FCC_NOFILE
    -1765328243: "no Kerberos ticket: run kinit (or point KRB5_CLIENT_KTNAME at a keytab)",  # KRB5_CC_NOTFOUND
    _KDC_UNREACH: "cannot reach the Kerberos KDC: check the network and krb5.conf",  # KRB5_KDC_UNREACH
    -1765328203: "the server's keytab has no key for the requested principal: ask the securecc admin to fix its keytab",  # KRB5_KT_NOTFOUND
}


class GSSFailure(AuthenticationFailure):
    """Kerberos authentication failed: ``str()`` is one sentence for the user (see :func:`explain`)."""


def _signed_minor(error: GSSError) -> int:
    minor = error.min_code or 0
    return minor - 2**32 if minor >= 2**31 else minor


def kdc_down(error: GSSError) -> bool:
    """The KDC could not be reached: an outage to back off, not a refusal."""
    return _signed_minor(error) == _KDC_UNREACH


PEER_FAILED = "Kerberos authentication failed; the server's log says why"


def explain(error: GSSError, target: str = "", peer: bool = False) -> str:
    """Turn a GSS-API error into one sentence that says what to do.  ``peer``: for an unauthenticated peer, which
    gets the sentences of the tables above and no more (the mechanism's own text may name the server's files)."""
    signed = _signed_minor(error)
    if signed in _KRB5_NAMED:
        return _KRB5_NAMED[signed]
    if isinstance(error, gssapi.exceptions.MissingCredentialsError) and "Decrypt" not in str(error):
        return _KRB5_NAMED[-1765328189]
    if isinstance(error, gssapi.exceptions.ExpiredCredentialsError):
        return _KRB5_MESSAGES[32]
    minor = error.min_code or 0
    if 0 <= minor - _KRB5_BASE < 128 and (minor - _KRB5_BASE) in _KRB5_MESSAGES:
        return _KRB5_MESSAGES[minor - _KRB5_BASE].format(target=target or "securecc/<host>")
    if peer:
        return PEER_FAILED
    detail = " ".join(error.gen_message().split())
    return f"Kerberos authentication failed: {detail}"


# What a stock distcc client asks for: it authenticates the connection but never wraps the stream.
DISTCC_FLAGS = frozenset({Flag.mutual_authentication, Flag.replay_detection, Flag.out_of_sequence_detection})


def _check_flags(context: gssapi.SecurityContext, required: frozenset[Flag] = REQUIRED_FLAGS) -> None:
    missing = required - set(context.actual_flags)
    if missing:
        names = ", ".join(sorted(f.name for f in missing))
        raise GSSFailure(f"the peer's security context lacks {names}: refusing it")


class Session:
    """Wrap and unwrap on a completed context, always with confidentiality."""

    def __init__(self, context: gssapi.SecurityContext) -> None:
        self._context = context

    def wrap(self, data: bytes) -> bytes:
        result = self._context.wrap(data, True)
        if not result.encrypted:
            raise GSSFailure("GSS-API refused to encrypt: refusing to send in the clear")
        return result.message

    def unwrap(self, data: bytes) -> bytes:
        result = self._context.unwrap(data)
        if not result.encrypted:
            raise GSSFailure("peer sent an unencrypted frame")
        return result.message


def target_name(principal: str) -> gssapi.Name:
    """``securecc/host[@REALM]`` as a Kerberos principal name (never canonicalized)."""
    return gssapi.Name(principal, gssapi.NameType.kerberos_principal)


class Initiator:
    """The client side: credentials from the default ccache or KRB5_CLIENT_KTNAME."""

    def __init__(self, principal: str, credentials: gssapi.Credentials | None = None) -> None:
        self.principal = principal
        self._context = gssapi.SecurityContext(
            name=target_name(principal),
            flags=list(REQUIRED_FLAGS),  # type: ignore[arg-type]  # python-gssapi takes an iterable of flags; its stub says int
            usage="initiate",
            creds=credentials,  # None: the default ccache or KRB5_CLIENT_KTNAME
        )

    def step(self, in_token: bytes | None = None) -> bytes | None:
        try:
            out: bytes | None = self._context.step(in_token)
            if self._context.complete:
                _check_flags(self._context)
            return out
        except GSSError as e:
            raise GSSFailure(explain(e, self.principal), kdc_down=kdc_down(e)) from None

    @property
    def complete(self) -> bool:
        return bool(self._context.complete)

    @property
    def lifetime(self) -> float:
        """Seconds the completed context stays valid: until the ticket it was made with expires."""
        return float(self._context.lifetime or 0)

    @property
    def server(self) -> str:
        """The server's principal as the completed context names it (with its realm)."""
        return str(self._context.target_name)

    def session(self) -> Session:
        return Session(self._context)


class Acceptor:
    """The server side: one set of credentials from the configured keytab."""

    def __init__(self, principal: str, keytab: str) -> None:
        try:
            self._credentials = gssapi.Credentials(
                usage="accept", name=target_name(principal), store={"keytab": keytab}
            )
            # Fail at start-up, not at the first client, when the key is absent.
            self._credentials.inquire()
        except GSSError as e:
            raise GSSFailure(f"cannot use keytab {keytab} for {principal}: {' '.join(e.gen_message().split())}") from None

    def new_context(self, required: frozenset[Flag] = REQUIRED_FLAGS) -> AcceptorContext:
        return AcceptorContext(gssapi.SecurityContext(creds=self._credentials, usage="accept"), required)


class AcceptorContext:
    """One connection's acceptor context."""

    def __init__(self, context: gssapi.SecurityContext, required: frozenset[Flag] = REQUIRED_FLAGS) -> None:
        self._context = context
        self._required = required
        self.principal: str | None = None
        self.lifetime = 0.0  # seconds from completion: the client's ticket's end
        self.server = ""  # the service principal the client authenticated to

    def step(self, in_token: bytes) -> bytes | None:
        """Consume a client token; return the reply token (possibly None).

        Raises GSSFailure (with the error token to forward) on any failure,
        including the deferred ones.
        """
        out: bytes | None = None
        try:
            out = self._context.step(in_token)
            if self._context.complete:  # raises a deferred acceptor error
                _check_flags(self._context, self._required)
                self.principal = str(self._context.initiator_name)
                self.lifetime = float(self._context.lifetime or 0)
                self.server = str(self._context.target_name)
            return out
        except GSSError as e:
            raise GSSFailure(explain(e, peer=True), token=out or e.token, detail=explain(e)) from None

    @property
    def complete(self) -> bool:
        return self.principal is not None

    def session(self) -> Session:
        return Session(self._context)
