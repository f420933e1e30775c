"""Provider keys: Vault access (vault.py), the key value (key.py), the keys held (store.py),
the Vault token (token.py) and the key manager that keeps them in step (manager.py)."""
