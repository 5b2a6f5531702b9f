"""pytest set-up and the session fixtures; the model builders are in helpers.py (a plain module)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import make_hf_model  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile("ci")
# The test models are tiny: a second thread only adds synchronisation, which costs seconds
# on a busy 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """(transformers model, our model, folder) for the TINY config."""
    from minigpt import GPT
    hf, folder = make_hf_model(tmp_path_factory.mktemp("tiny"))
    return hf, GPT.from_pretrained(str(folder)), folder


@pytest.fixture(scope="session")
def tokenizer():
    from minigpt import get_tokenizer
    return get_tokenizer()
