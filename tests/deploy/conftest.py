import sys
from pathlib import Path

# tests/deploy has no __init__.py (like the other test folders): make its helper module importable.
sys.path.insert(0, str(Path(__file__).parent))
