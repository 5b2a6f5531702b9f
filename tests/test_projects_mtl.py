"""demos/projects/mtl_compare.py (issue 30): MTL-LoRA vs one shared LoRA vs three separate LoRAs, on the micro
random model (--smoke). A random model's perplexities mean nothing: the test checks the contract, that the table
and the figure come from the run's own numbers, that the saved MTL-LoRA loads back and reproduces the reported
perplexities, and that the shared LoRA is matched to MTL-LoRA's parameter count."""
from __future__ import annotations

import copy

import pytest

from demos.projects import mtl_compare
from helpers import PNG_MAGIC, check_project_contract, help_text, smoke_runs_of

PROJECT = mtl_compare.PROJECT
ROWS = ("base model", "MTL-LoRA (mixed data)", "one shared LoRA (mixed data)", "three separate LoRAs")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return smoke_runs_of([PROJECT], tmp_path_factory)[PROJECT.name]


def test_smoke_run_contract_table_figure_and_adapter(smoke):
    from demos.kits import text_perplexity
    from minigpt import GPT, GPTConfig
    from techniques.lora import load_mtl_lora, task_ids
    code, out = smoke
    metrics = check_project_contract(PROJECT, code, out)
    rows = metrics["extra"]["rows"]
    assert set(rows) == set(ROWS)
    mtl, shared, sep = rows[ROWS[1]], rows[ROWS[2]], rows[ROWS[3]]
    assert metrics["before"] == pytest.approx(shared["mean_perplexity"])
    assert metrics["after"] == pytest.approx(mtl["mean_perplexity"])
    assert abs(mtl["trainable_parameters"] - shared["trainable_parameters"]) <= 0.05 * shared["trainable_parameters"]
    assert sep["trainable_parameters"] == 3 * shared["trainable_parameters"]
    assert all(r["train_seconds"] > 0 for r in (mtl, shared, sep))
    table = (out / "table.md").read_text()
    for name in ROWS:
        assert name in table
    assert f"{mtl['perplexity']['scifi']:.2f}" in table
    assert (out / "compare.png").read_bytes().startswith(PNG_MAGIC)
    # the saved MTL-LoRA gives back the reported per-task perplexity: the smoke model is the micro config built
    # after torch.manual_seed(--seed), so it is rebuilt here the same way
    import torch
    from demos.common import MICRO_CONFIG
    torch.manual_seed(1)
    base = GPT(GPTConfig(**MICRO_CONFIG)).eval()
    model, tasks = load_mtl_lora(copy.deepcopy(base), out / "mtl_adapter")
    assert tasks == list(mtl_compare.TASKS)
    data = mtl_compare.task_data(mtl_compare.SIZES["smoke"], mtl_compare.SIZES["smoke"].max_len)
    for t, name in enumerate(tasks):
        _, texts, contexts = data[name]
        with task_ids(model, [t]):
            assert text_perplexity(model, texts, contexts).value == pytest.approx(mtl["perplexity"][name], rel=1e-4)
        assert text_perplexity(base, texts, contexts).value == pytest.approx(rows[ROWS[0]]["perplexity"][name],
                                                                             rel=1e-4)


def test_help(capsys):
    text = help_text(PROJECT, capsys)
    for opt in ("--model", "--weights", "--out", "--smoke", "--steps", "--lr", "--seed"):
        assert opt in text


def test_average_over_seeds_is_the_mean_with_its_sd_and_the_verdict_counts_seeds():
    """--seeds N: each row's per-task perplexity is the mean over seeds, its sd is the sample sd of the seeds'
    means, and the verdict says in how many seeds MTL-LoRA was lower (here 1 of 2, while its average is higher)."""
    def rows(mtl: tuple, shared: tuple) -> dict:
        def row(ppl):
            return {"ppl": dict(zip(mtl_compare.TASKS, ppl)), "params": 10, "seconds": 1.0,
                    "mean_ppl": sum(ppl) / len(ppl)}
        return {ROWS[1]: row(mtl), ROWS[2]: row(shared)}
    per_seed = [rows((10.0, 20.0, 30.0), (11.0, 21.0, 31.0)), rows((40.0, 50.0, 60.0), (12.0, 22.0, 32.0))]
    avg = mtl_compare.average(per_seed)
    assert avg[ROWS[1]]["ppl"] == {"poetry": 25.0, "scifi": 35.0, "chemistry": 45.0}
    assert avg[ROWS[1]]["mean_ppl"] == pytest.approx(35.0)
    assert avg[ROWS[1]]["sd"] == pytest.approx((2 * 15.0 ** 2) ** 0.5)     # seeds' means 20 and 50
    assert avg[ROWS[2]]["sd"] == pytest.approx(2 ** -0.5)                 # 21 and 22
    verdict = mtl_compare._verdict(avg, per_seed)
    assert "does not hold" in verdict and "lower in 1 of 2 seeds" in verdict
    one = mtl_compare.average(per_seed[:1])
    assert one[ROWS[1]]["sd"] == 0.0 and "One run, one seed" in mtl_compare._verdict(one, per_seed[:1])
