#!/usr/bin/env python
"""Publish a finished training run to the Hub in one commit: `python hub/push_model.py --help`.

A thin wrapper; the command is `cdcl_hf.commands.push` (installed as `cdcl-push`).
"""

import sys

from cdcl_hf.commands.push import main

if __name__ == "__main__":
    sys.exit(main())
