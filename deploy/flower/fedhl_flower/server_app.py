"""The federation's ServerApp (``fedhl_jax.deploy.server_app``)."""

from fedhl_jax.deploy.server_app import app  # noqa: F401
