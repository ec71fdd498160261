"""The federation's ServerApp (``fedhl_jax.deploy.server_app``)."""

from fedhl_jax.deploy import server_app as _server_app

app = _server_app.app  # an assignment: Flower looks for ``app =`` in this file
