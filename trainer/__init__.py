"""The training job (floor 5 of the layering: README.md, Layout): ``trainer/main.py`` with its two tasks,
upstream DERM models (``trainer.loop``) and downstream CTR / CVR models (``trainer.downstream``),
their run configs (``trainer.config``) and metrics. Imports every floor below; nothing below
imports it."""
