"""Efficiency study: how much of what extra depth buys does dynamic depth keep, per unit of compute?

    python recipes/study.py --config recipes/configs/study_depth.yaml [key=value ...]

The study itself is the package dlo/study/ (``python recipes/study.py --help`` describes it).
"""

import sys

from dlo.study import main

if __name__ == "__main__":
    sys.exit(main())
