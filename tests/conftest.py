"""Shared test configuration.

Tests run with ``--import-mode=importlib`` against the *installed* fastmaml,
so the checkout's ``fastmaml/`` can never shadow it. Only this folder is put
on ``sys.path``, for the NumPy reference implementation (``reference.py``).
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
