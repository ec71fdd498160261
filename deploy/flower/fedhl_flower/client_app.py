"""The federation's ClientApp (``fedhl_jax.deploy.client_app``)."""

from fedhl_jax.deploy import client_app as _client_app

app = _client_app.app  # an assignment: Flower looks for ``app =`` in this file
