"""Train CDCL (or plain DINO, the baseline) on a high-content screen: `accelerate launch training/train.py --help`.

A thin wrapper kept for `accelerate launch`, which takes a script path; the command is `cdcl_hf.commands.train`
(installed as `cdcl-train`) and its stages are in `cdcl_hf.training`.
"""

import sys

from cdcl_hf.commands.train import main
from cdcl_hf.training.arguments import parse_args  # noqa: F401  (the presets test parses through this script)

if __name__ == "__main__":
    sys.exit(main())
