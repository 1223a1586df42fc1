"""Commands for operators: securecc-admin (keys, checks) and securecc-audit (verify, read the audit log)."""
