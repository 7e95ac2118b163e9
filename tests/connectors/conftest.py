"""Make the helper module importable by the connector tests."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
