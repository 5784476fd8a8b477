#!/usr/bin/env python
"""DynSparse BERT pre-training: ``python run_pretraining.py --config bert_medium_sparse``.

Run with ``--help`` for the options; ``python -m ipu_app`` holds every other command.
"""

import sys

from ipu_app.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
