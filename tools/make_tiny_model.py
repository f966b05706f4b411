#!/usr/bin/env python
"""Write the embedded default's tiny model into a directory (see justrl/tiny_model.py).

    python tools/make_tiny_model.py models/tiny [--seed 0] [--warm-start-steps 300]
"""
import sys

from justrl.tiny_model import main

if __name__ == "__main__":
    sys.exit(main())
