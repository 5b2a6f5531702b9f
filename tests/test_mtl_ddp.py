"""MTL-LoRA on several processes (issue 30): `torchrun ... -m techniques.lora train --mtl` trains the adapter one
process trains with the same global batch, and the batches' mixed task ids go to the ranks with their examples.
The tolerance is the existing DDP tests' (tests/test_scale.py): 1e-6 on every trained tensor."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

import ddp_worker
from test_scale import ROOT, clean_env, max_diff, processes_run


def test_two_gloo_processes_split_mixed_task_batches_and_train_as_one(tmp_path):
    """2 processes x batch 4 == 1 process x batch 8, for 3 steps of MTL-LoRA on three mixed tasks: each rank's
    micro-batch is its consecutive half of the step's examples, each example with its own task id."""
    results = processes_run("mtl", tmp_path / "two.safetensors", world=2, batch=4)
    assert all(code == 0 for code, _, _ in results), results
    one = ddp_worker.run("mtl", batch_size=8, grad_accum=1, steps=3)
    single = list(ddp_worker.SEEN)
    two = load_file(str(tmp_path / "two.safetensors"))
    diff = max_diff(one, two)
    print(f"\nMTL-LoRA, 2 gloo processes vs 1: max |tensor diff| after 3 steps = {diff:.2e}")
    assert diff < 1e-6
    ranks = [json.loads(Path(f"{tmp_path / 'two.safetensors'}.rank{r}.json").read_text()) for r in (0, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 3
    for (tasks, firsts), (t0, f0), (t1, f1) in zip(single, *ranks):
        assert len(t0) == len(t1) == 4
        assert t0 + t1 == tasks and f0 + f1 == firsts       # rank r holds the r-th half of the step's batch
        for t, first in zip(t0 + t1, f0 + f1):
            assert first // 1000 == t                        # and each example keeps its own task's id
    assert any(len(set(t)) > 1 for r in ranks for t, _ in r)   # the ranks' batches really mix tasks
    assert any(set(t0) != set(t1) for (t0, _), (t1, _) in zip(*ranks))
    assert max_diff(one, ddp_worker.run("mtl", batch_size=8, grad_accum=1, steps=1)) > 1e-4  # it trains


def _task_files(tmp_path) -> list[str]:
    files = []
    for name, text in (("poetry", "the moon is bright upon the silent sea. "),
                       ("scifi", "the starship jumped to warp near the red dwarf. "),
                       ("chem", "sodium reacts with water to give hydrogen. ")):
        f = tmp_path / f"{name}.txt"
        f.write_text(text * 12)
        files += ["--data", str(f)]
    return files


def test_torchrun_train_mtl_equals_one_process(tiny_hf, tmp_path):
    """The real command line: `torchrun --standalone --nproc_per_node 2 -m techniques.lora train --mtl` for 2 steps
    of batch 2 per process saves the MTL-LoRA that one process with batch 4 saves (run in this process, single
    threaded as the workers); only rank 0 prints."""
    torchrun = Path(sys.executable).parent / "torchrun"
    launcher = [str(torchrun)] if torchrun.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    args = ["-m", "techniques.lora", "train", "--mtl", "--tasks", "poetry,scifi,chem", *_task_files(tmp_path),
            "--weights", str(tiny_hf[2]), "--block-size", "16", "--device", "cpu", "--no-progress",
            "--precision", "fp32", "--max-steps", "2", "--lr", "1e-2", "--eval-fraction", "0", "--rank", "2",
            "--n-up", "2"]
    two = subprocess.run([*launcher, "--standalone", "--nproc_per_node", "2", *args, "--batch-size", "2",
                          "--out", str(tmp_path / "two")], cwd=ROOT, env=clean_env(), capture_output=True,
                         text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("training 2 steps") == 1 and two.stdout.count("saved MTL-LoRA") == 1
    assert "batch 2 x 2 processes = 4 examples per step" in two.stdout
    from techniques.lora.__main__ import main
    assert main([*args[2:], "--batch-size", "4", "--out", str(tmp_path / "one")]) == 0   # one process, in here
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("one", "two"))
    diff = max_diff(a, b)
    print(f"\ntorchrun train --mtl, 2 processes vs 1: max |tensor diff| = {diff:.2e}")
    assert diff < 1e-6
    assert any("mtl_lora_Lambda" in k for k in a) and all(a[k].abs().sum() > 0 for k in a if "mtl_lora_B" in k)
    assert json.loads((tmp_path / "two" / "adapter_config.json").read_text()) == \
        json.loads((tmp_path / "one" / "adapter_config.json").read_text())
