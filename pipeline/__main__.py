"""``python -m pipeline``: the daily pipeline driver (pipeline/driver.py)."""

from pipeline.driver import main

raise SystemExit(main())
