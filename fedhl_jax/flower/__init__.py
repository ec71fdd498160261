"""Real federations with Flower (docs/deployment.md).

``node``: a node's local training and the wire format (no Flower needed); ``strategy``: the
server's ``FedLoRAStrategy``; ``server_app`` / ``client_app``: the Flower ``ServerApp`` and
``ClientApp`` (the Flower app project is ``deploy/flower/``).
"""
