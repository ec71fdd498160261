#!/usr/bin/env python3
"""Federated LoRA fine-tuning with heterogeneous ranks.

  python bin/train.py --config configs/quickstart.yaml --out runs/quickstart [key=value ...] [--resume]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedhl_jax.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
