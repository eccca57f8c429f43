"""Chart tests render with Helm's Go engine through helm_python (see helmrender.py).

Test modules import the helpers directly: `from helmrender import render, one, ...`.
"""
from __future__ import annotations

import sys
from pathlib import Path

# Importable whatever pytest's import mode: other chart test modules share these helpers.
sys.path.insert(0, str(Path(__file__).resolve().parent))
