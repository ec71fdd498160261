#!/usr/bin/env python3
"""``fedhl-bias`` from a checkout: python bin/bias_experiment.py [--rounds 150] [--seeds 0 1 2]"""
from fedhl_jax.experiments.bias_experiment import main

raise SystemExit(main())
