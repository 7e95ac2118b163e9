"""Make the dry-run helper module (deploy_plan.py) importable by the deploy tests."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
