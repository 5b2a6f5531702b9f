"""Runnable demos: `python -m demos.tour`, `python -m demos.pretrain`, ..."""
