"""securecc: a Kerberos-secured distributed compile service (see DESIGN in the README)."""

__version__ = "0.1.0"
