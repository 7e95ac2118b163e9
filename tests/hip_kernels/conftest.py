"""Make the kernel test support module (kernel_testing) importable by the kernel tests."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
