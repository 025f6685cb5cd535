"""``python -m utils.checkpoint ...``"""

import sys

from utils.checkpoint.cli import main

main(sys.argv[1:])
