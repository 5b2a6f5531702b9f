"""The tutorial's projects, made real: each one trains or steers with the library and is measured
before and after by a yardstick nobody here wrote. `python -m demos.projects` lists and runs them.

Each project module declares itself once, as `PROJECT = Project(...)` (demos.projects.common). This
package holds only their names in the tutorial's order; `load(name)` imports a module and returns its
record, which the runner, the index and the tests read."""
from __future__ import annotations

import importlib

__all__ = ["PROJECT_NAMES", "load", "load_all"]

# The order of the tutorial: PPLM's projects, prefix tuning's, LoRA's, the system that composes them, the
# comparison of the steering methods, the side-by-side of prefix tuning, Prefix-Tuning+ and LoRA, then MTL-LoRA
# against shared and separate LoRAs.
PROJECT_NAMES = ("sentiment_story", "hiring_ad", "hypothesis", "summarizer", "explainer", "table_to_text",
                 "squad_qa", "poetry", "scifi", "chemistry", "hybrid", "steering", "prefix_compare", "mtl_compare")


def load(name: str):
    """The Project record of demos/projects/<name>.py."""
    if name not in PROJECT_NAMES:
        raise ValueError(f"unknown project {name!r}; choose from {', '.join(PROJECT_NAMES)}")
    return importlib.import_module(f"demos.projects.{name}").PROJECT


def load_all() -> list:
    """Every project's record, in the tutorial's order."""
    return [load(name) for name in PROJECT_NAMES]
