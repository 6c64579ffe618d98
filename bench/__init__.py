"""keygate's benchmark suite: ``python -m bench`` (see bench/README.md).

Everything runs in one process and one run, against a real SoftHSM token and a real SQLite
registry in a temporary directory, next to the plain ``cryptography`` AES-GCM loop on the same
records, so the reported numbers are ratios taken under the same machine conditions.
"""
