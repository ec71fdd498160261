"""fedhl-jax as a Flower app: the ServerApp and ClientApp live in ``fedhl_jax.flower``."""
