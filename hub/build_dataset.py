#!/usr/bin/env python
"""Turn a screen on disk into a Hugging Face dataset: `python hub/build_dataset.py --help`.

A thin wrapper; the command is `cdcl_hf.commands.build_dataset` (installed as `cdcl-build-dataset`).
"""

import sys

from cdcl_hf.commands.build_dataset import main

if __name__ == "__main__":
    sys.exit(main())
