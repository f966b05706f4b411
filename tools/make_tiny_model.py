#!/usr/bin/env python
"""Write the embedded default's tiny model into a directory (see justrl/model/tiny.py).

    python tools/make_tiny_model.py models/tiny [--seed 0] [--warm-start-steps 300]
"""
import sys

from justrl.model.tiny import main

if __name__ == "__main__":
    sys.exit(main())
