"""Provider keys: Vault access (vault.py) and the key manager (manager.py)."""
