"""Self-contained experiments built on the pure server math."""
