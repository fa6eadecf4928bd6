"""``python -m data.movielens``: see ``data.movielens.cli``."""

import sys

from data.movielens.cli import main

sys.exit(main())
