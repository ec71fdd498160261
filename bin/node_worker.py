#!/usr/bin/env python3
"""``fedhl-node-worker`` from a checkout: python bin/node_worker.py --socket /run/fedhl/node0.sock"""
from fedhl_jax.flower.worker import main

raise SystemExit(main())
