"""The federation's ServerApp (``fedhl_jax.flower.server_app``)."""

from fedhl_jax.flower import server_app as _server_app

app = _server_app.app  # an assignment: Flower looks for ``app =`` in this file
