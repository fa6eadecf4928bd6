"""The paper's offline experiments (lift.py) and their report (report.py); see docs/experiments.md."""
