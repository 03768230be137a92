"""Evaluate a checkpoint's embeddings on a screen: `python training/evaluate_embeddings.py --help`.

A thin wrapper; the command is `cdcl_hf.commands.evaluate` (installed as `cdcl-evaluate`).
"""

import sys

from cdcl_hf.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
