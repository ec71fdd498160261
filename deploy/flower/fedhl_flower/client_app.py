"""The federation's ClientApp (``fedhl_jax.deploy.client_app``)."""

from fedhl_jax.deploy.client_app import app  # noqa: F401
