#!/usr/bin/env python
"""DynSparse BERT pre-training: ``python run_pretraining.py --config bert_medium_sparse``.

The same as ``python -m ipu_app train``; run with ``--help`` for the options. ``python -m ipu_app``
holds every other command.
"""

import sys

from ipu_app.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
