"""The federation's ClientApp (``fedhl_jax.flower.client_app``)."""

from fedhl_jax.flower import client_app as _client_app

app = _client_app.app  # an assignment: Flower looks for ``app =`` in this file
