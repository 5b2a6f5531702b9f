"""Runnable demos: `python -m demos.tour`, `python -m demos.shakespeare_from_scratch`, ..."""
