"""`python -m compiler.tuning`: see compiler/tuning/tune.py."""
import sys

from .tune import main

sys.exit(main())
