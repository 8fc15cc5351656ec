#!/usr/bin/env python
"""Entry point: `python main.py COMMAND --config FILE [...]` (see `python main.py --help`)."""

import sys

from sparse_ssm.cli import main

if __name__ == "__main__":
    sys.exit(main())
