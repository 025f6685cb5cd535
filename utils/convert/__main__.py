"""``python -m utils.convert ...``"""

import sys

from utils.convert.cli import main

main(sys.argv[1:])
