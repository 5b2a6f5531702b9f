"""Training at scale: mixed precision, gradient accumulation, exact resume, several processes.

Each claim is checked against the run it replaces: a bf16 run against the fp32 run, accumulated
micro-batches against one step on their concatenation, a resumed run against an uninterrupted
one, two gloo processes (a real all-reduce) against one process with twice the batch.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ddp_worker
from minigpt import (GPT, GPTConfig, TrainConfig, TrainingInterrupted, examples_from_text, lm_loss_fn,
                     train)
from demos.pretrain import wall_time
from minigpt.cli import describe_plan
from minigpt.train_state import read_meta
from techniques.lora import apply_lora, lora_parameters
from techniques.prefix import PrefixTuning

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "ddp_worker.py"
SMALL = GPTConfig(vocab_size=50257, n_positions=48, n_embd=32, n_layer=2, n_head=4,
                  embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ---- mixed precision ---------------------------------------------------------------------------
def pattern_run(precision: str, steps: int = 40):
    torch.manual_seed(0)
    model = GPT(SMALL)
    data = examples_from_text([(i * 7) % 50 + 1000 for i in range(1200)], 24)  # a repeating pattern: learnable
    cfg = TrainConfig(max_steps=steps, batch_size=8, lr=1e-2, eval_every=10, progress=False, precision=precision)
    history = train(model.parameters(), lm_loss_fn(model), data[:-4], eval_examples=data[-4:], config=cfg,
                    eval_modules=[model])
    return model, [h["loss"] for h in history], history


def test_bf16_tracks_the_fp32_loss_curve_and_keeps_fp32_weights():
    """40 steps of pre-training a small model: the bf16 autocast loss stays within 0.05 nats + 2% of the fp32 one
    at every step (measured: 0.013 at most; fp16 0.004), the loss falls the same way, and the weights AdamW updates
    stay fp32."""
    model32, fp32, _ = pattern_run("fp32")
    model16, bf16, history = pattern_run("bf16")
    assert all(p.dtype == torch.float32 for p in model16.parameters())
    gaps = [abs(a - b) for a, b in zip(fp32, bf16)]
    assert all(g <= 0.05 + 0.02 * a for g, a in zip(gaps, fp32)), max(gaps)
    assert bf16[-1] < 0.5 * bf16[0] and fp32[-1] < 0.5 * fp32[0]
    assert max(gaps) > 0  # bf16 really ran: the curves are close, not identical
    assert [h["step"] for h in history if "eval_loss" in h] == [9, 19, 29, 39]


def test_fp16_with_loss_scaling_trains():
    """fp16 (slow on a CPU, meant for GPUs) with torch.amp.GradScaler: the loss falls, the weights stay fp32."""
    model, losses, history = pattern_run("fp16", steps=10)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < 0.8 * losses[0]


def test_precision_is_checked():
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        TrainConfig(precision="int8")


# ---- gradient accumulation ---------------------------------------------------------------------
def lora_model(seed: int = 0, dropout: float = 0.0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(SMALL)
    apply_lora(model, r=4, alpha=8, targets=("c_attn", "mlp.c_fc"), dropout=dropout, verbose=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".B"):
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(len(n)))
    return model


def lora_state(model: GPT) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("batch, accum", [(2, 4), (1, 8), (3, 3)])
def test_accumulated_micro_batches_make_the_step_of_their_concatenation(batch, accum):
    """23 prompt -> completion pairs whose completions differ in length, so the micro-batches hold different
    numbers of target tokens: each is weighted by its share of the step's tokens, and batch x accum examples
    accumulated give the update of one batch of batch x accum (fp32: weights within 1e-6 after 3 steps, which
    include the epoch's short last step, split as evenly as it goes)."""
    data = ddp_worker.examples()
    results = []
    for b, a in ((batch * accum, 1), (batch, accum)):
        model = lora_model()
        cfg = TrainConfig(max_steps=3, batch_size=b, grad_accum=a, lr=1e-3, progress=False)
        history = train(lora_parameters(model), lm_loss_fn(model), data, config=cfg)
        results.append((lora_state(model), [h["loss"] for h in history]))
    (one, loss_one), (acc, loss_acc) = results
    assert max_diff(one, acc) < 1e-6
    assert loss_one == pytest.approx(loss_acc, rel=1e-6)


def test_the_global_token_count_matters():
    """Averaging the micro-batches' mean losses instead (each weighted the same) is a different update:
    the test above would catch a loop that forgot the token counts."""
    data = ddp_worker.examples()
    model = lora_model()
    opt_params = lora_parameters(model)
    loss_fn = lm_loss_fn(model)
    from minigpt import collate_lm
    big = collate_lm(data[:8])
    grads_big = torch.autograd.grad(loss_fn(big), opt_params)
    halves = [collate_lm(data[:4]), collate_lm(data[4:8])]
    naive = [sum(g) / 2 for g in zip(*(torch.autograd.grad(loss_fn(h), opt_params) for h in halves))]
    assert max((a - b).abs().max().item() for a, b in zip(grads_big, naive)) > 1e-4


# ---- checkpoints and exact resume ----------------------------------------------------------------
class StopAt:
    """A loss function that presses Ctrl-C at its n-th call (as a user would, mid-run)."""

    def __init__(self, loss_fn, n: int):
        self.loss_fn, self.n, self.calls = loss_fn, n, 0

    def __call__(self, batch):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.loss_fn(batch)


def interrupted_then_resumed(make, tmp_path, steps=7, save_every=3, stop_call=6, **cfg):
    """(uninterrupted state, history), (resumed state, history): `make()` -> (params, loss_fn, state_fn)."""
    data = ddp_worker.examples()
    base = dict(max_steps=steps, batch_size=4, lr=3e-3, progress=False, eval_every=2, **cfg)
    params, loss_fn, state_fn = make()
    full = train(params, loss_fn, data, eval_examples=data[:5], config=TrainConfig(**base))
    full_state = state_fn()

    params, loss_fn, state_fn = make()
    ckpt = tmp_path / "train_state"
    with pytest.raises(TrainingInterrupted, match=rf"the last checkpoint \(step {save_every}\) is in .*--resume"):
        train(params, StopAt(loss_fn, stop_call), data, eval_examples=data[:5],
              config=TrainConfig(**base, save_every=save_every, checkpoint_dir=str(ckpt)))
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == save_every

    params, loss_fn, state_fn = make()  # a new process: the model rebuilt from scratch, then the checkpoint
    resumed = train(params, loss_fn, data, eval_examples=data[:5],
                    config=TrainConfig(**base, resume_from=str(ckpt)))
    return (full_state, full), (state_fn(), resumed)


def test_lora_resumed_equals_uninterrupted(tmp_path):
    """Dropout on the LoRA branch, 7 steps of 4 over 23 examples (an epoch boundary at step 6), Ctrl-C during
    step 6, resumed from the checkpoint of step 3: the same weights and history, to the bit."""
    def make():
        model = lora_model(dropout=0.3)
        model.train()
        return lora_parameters(model), lm_loss_fn(model), lambda: lora_state(model)
    (a, ha), (b, hb) = interrupted_then_resumed(make, tmp_path)
    assert max_diff(a, b) == 0.0 and ha == hb and len(hb) == 7


def test_prefix_resumed_equals_uninterrupted(tmp_path):
    def make():
        torch.manual_seed(0)
        model = GPT(SMALL)
        prefix = PrefixTuning(SMALL, 4, projection=True, hidden_size=16, dropout=0.2)

        def params_and_loss():
            model.requires_grad_(False)
            prefix.train()
            past_fn = lambda B: (prefix.past_key_values(B), prefix.num_virtual_tokens)  # noqa: E731
            return prefix.parameters(), lm_loss_fn(model, past_fn=past_fn)
        p, f = params_and_loss()
        return p, f, lambda: {k: v.detach().clone() for k, v in prefix.state_dict().items()}
    (a, ha), (b, hb) = interrupted_then_resumed(make, tmp_path, precision="bf16")
    assert max_diff(a, b) == 0.0 and ha == hb


def test_pretraining_resumed_equals_uninterrupted(tmp_path):
    """Every weight of the model trained (the embedding tied to the head), dropout on."""
    cfg = GPTConfig(**{**SMALL.__dict__, "embd_pdrop": 0.1, "resid_pdrop": 0.1, "attn_pdrop": 0.1})

    def make():
        torch.manual_seed(0)
        model = GPT(cfg).train()
        return model.parameters(), lm_loss_fn(model), lambda: {k: v.clone() for k, v in model.state_dict().items()}
    (a, ha), (b, hb) = interrupted_then_resumed(make, tmp_path, stop_call=10, grad_accum=2)  # call 10: step 5
    assert max_diff(a, b) == 0.0 and ha == hb


def test_resume_refuses_a_different_run(tmp_path):
    data = ddp_worker.examples()
    model = lora_model()
    ckpt = tmp_path / "ckpt"
    train(lora_parameters(model), lm_loss_fn(model), data,
          config=TrainConfig(max_steps=2, batch_size=4, save_every=2, checkpoint_dir=str(ckpt), progress=False),
          run_info={"r": 4})
    model = lora_model()
    with pytest.raises(ValueError, match=r"batch_size: 4 in the checkpoint, 5 now.*r: 4 in the checkpoint, 8 now"):
        train(lora_parameters(model), lm_loss_fn(model), data,
              config=TrainConfig(max_steps=2, batch_size=5, resume_from=str(ckpt), progress=False),
              run_info={"r": 8})
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        train(lora_parameters(model), lm_loss_fn(model), data,
              config=TrainConfig(max_steps=2, batch_size=4, resume_from=str(tmp_path), progress=False))


def test_the_plan_line_shows_the_effective_batch_and_precision():
    cfg = TrainConfig(max_steps=10, batch_size=4, grad_accum=3, precision="bf16")
    line = describe_plan(100, 0, cfg, world_size=2)
    assert line.startswith("training 10 steps (2 epochs of 5 steps, batch 4 x 3 accumulated x 2 processes = 24 "
                           "examples per step) on 100 examples; no eval split; bf16 autocast")


# ---- the commands: --save-every, --resume, Ctrl-C ------------------------------------------------
def lora_cli(folder, data, out, *extra):
    from techniques.lora.__main__ import main
    return main(["train", "--weights", str(folder), "--data", str(data), "--block-size", "16", "--batch-size", "3",
                 "--device", "cpu", "--no-progress", "--precision", "fp32", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 60, encoding="utf-8")
    return path


def test_lora_cli_resume_continues_a_checkpoint_exactly(tiny_hf, text_file, tmp_path, capsys):
    """A 5-step run checkpoints at step 3; the same command with --resume takes steps 4 and 5 from there and
    saves the adapter of the uninterrupted run."""
    folder = tiny_hf[2]
    assert lora_cli(folder, text_file, tmp_path / "a", "--max-steps", "5", "--save-every", "3",
                    "--dropout", "0.2") == 0
    assert json.loads((tmp_path / "a" / "train_state" / "trainer_state.json").read_text())["step"] == 3
    capsys.readouterr()
    assert lora_cli(folder, text_file, tmp_path / "b", "--max-steps", "5", "--dropout", "0.2",
                    "--resume", str(tmp_path / "a" / "train_state")) == 0
    assert "resuming from" in capsys.readouterr().out
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in "ab")
    assert max_diff(a, b) == 0.0
    ha, hb = (json.loads((tmp_path / d / "history.json").read_text())["history"] for d in "ab")
    assert ha == hb
    # another rank: refused, with the difference named
    code = lora_cli(folder, text_file, tmp_path / "c", "--max-steps", "5", "--dropout", "0.2", "--r", "4",
                    "--resume", str(tmp_path / "a" / "train_state"))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "r: 8 in the checkpoint, 4 now" in err


def test_prefix_cli_resume_continues_a_checkpoint_exactly(tiny_hf, text_file, tmp_path):
    from techniques.prefix.__main__ import main
    common = ["train", "--weights", str(tiny_hf[2]), "--data", str(text_file), "--block-size", "16",
              "--batch-size", "3", "--device", "cpu", "--no-progress", "--max-steps", "4", "--projection",
              "--hidden", "8", "--num-virtual-tokens", "3"]
    assert main([*common, "--save-every", "3", "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--resume", str(tmp_path / "a" / "train_state"), "--out", str(tmp_path / "b")]) == 0
    for name in ("adapter_model.safetensors", "checkpoint/prefix_checkpoint.safetensors"):
        assert max_diff(*(load_file(str(tmp_path / d / name)) for d in "ab")) == 0.0


def test_pretraining_command_resumes_exactly(tmp_path):
    run = [sys.executable, "-m", "demos.pretrain", "--smoke", "--no-progress", "--steps", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    a = subprocess.run([*run, "--save-every", "3", "--out", str(tmp_path / "a")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert a.returncode == 0, a.stderr
    b = subprocess.run([*run, "--resume", str(tmp_path / "a" / "train_state"), "--out", str(tmp_path / "b")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert b.returncode == 0, b.stderr
    assert max_diff(*(load_file(str(tmp_path / d / "model.safetensors")) for d in "ab")) == 0.0
    # b's report counts its one step here and the checkpoint's record of the three before it
    checkpoint = read_meta(tmp_path / "a" / "train_state")
    t = json.loads((tmp_path / "b" / "summary.json").read_text())["training"]
    assert checkpoint["step"] == t["resumed_at_step"] == 3 and t["seconds_before_resume"] == checkpoint["seconds"] > 0
    assert t["seconds_per_step"] == t["seconds"] and "from step 3 on" in wall_time(json.loads(
        (tmp_path / "b" / "summary.json").read_text()))


def test_a_checkpoint_carries_the_wall_time_of_its_steps_over_resumes(tmp_path):
    """Each save records the time of every step so far: the resumed run's checkpoint adds its own steps to the
    one it resumed from. A checkpoint written before the record existed resumes, and reports None."""
    data = ddp_worker.examples()
    cfg = dict(max_steps=4, batch_size=4, lr=3e-3, progress=False, save_every=2)
    torch.manual_seed(0)
    model = GPT(SMALL)
    first, second = tmp_path / "first", tmp_path / "second"
    with pytest.raises(TrainingInterrupted):  # Ctrl-C during step 3: the checkpoint of step 2 stays
        train(model.parameters(), StopAt(lm_loss_fn(model), 3), data,
              config=TrainConfig(checkpoint_dir=str(first), **cfg))
    meta = read_meta(first)
    assert meta["step"] == 2 and meta["seconds"] > 0
    meta["seconds"] = 1000.0  # as if the first two steps had taken that long: the resumed record must add to it
    (first / "trainer_state.json").write_text(json.dumps(meta))
    t0 = time.perf_counter()
    train(model.parameters(), lm_loss_fn(model), data,
          config=TrainConfig(checkpoint_dir=str(second), resume_from=str(first), **cfg))
    spent = time.perf_counter() - t0
    assert read_meta(second)["step"] == 4 and 1000.0 < read_meta(second)["seconds"] <= 1000.0 + spent
    del meta["seconds"]  # as a checkpoint from before the record existed
    (first / "trainer_state.json").write_text(json.dumps(meta))
    train(model.parameters(), lm_loss_fn(model), data,
          config=TrainConfig(checkpoint_dir=str(second), resume_from=str(first), **cfg))
    assert read_meta(second)["seconds"] is None


def test_ctrl_c_just_after_a_save_commits_names_that_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C can land after step 3's checkpoint is committed on disk but before the loop records it (seen once in
    CI with a real SIGINT: the message said step 6, the disk held step 7). The message names what the disk holds;
    a Ctrl-C before any save of this run still names nothing on disk from an older run."""
    import minigpt.training as training
    real = training.save_train_state

    def save_then_ctrl_c(directory, state, **kw):
        out = real(directory, state, **kw)
        if state.step == 3:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(training, "save_train_state", save_then_ctrl_c)
    torch.manual_seed(0)
    model = GPT(SMALL)
    cfg = dict(max_steps=5, batch_size=4, lr=3e-3, progress=False, save_every=1, checkpoint_dir=str(tmp_path / "c"))
    with pytest.raises(TrainingInterrupted, match=r"the last checkpoint \(step 3\)"):
        train(model.parameters(), lm_loss_fn(model), ddp_worker.examples(), config=TrainConfig(**cfg))
    assert read_meta(tmp_path / "c")["step"] == 3
    monkeypatch.setattr(training, "save_train_state", real)
    with pytest.raises(KeyboardInterrupt) as caught:   # Ctrl-C at the first step: the old run's checkpoint is not
        train(model.parameters(), StopAt(lm_loss_fn(model), 1), ddp_worker.examples(),   # this run's
              config=TrainConfig(**cfg))
    assert not isinstance(caught.value, TrainingInterrupted)


def test_ctrl_c_keeps_the_last_checkpoint_and_says_where(tiny_hf, text_file, tmp_path):
    """A real SIGINT to a running `python -m techniques.lora train --save-every 1`: exit code 130, one line naming
    the checkpoint and how to resume, and that checkpoint is complete."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "techniques.lora", "train", "--weights", str(tiny_hf[2]),
                             "--data", str(text_file), "--block-size", "16", "--batch-size", "2", "--device", "cpu",
                             "--no-progress", "--max-steps", "100000", "--save-every", "1", "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            # a shell's background job starts with SIGINT ignored, and Python then installs no
                            # KeyboardInterrupt handler: give the child the default, as a terminal would
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    state = out / "train_state" / "trainer_state.json"
    deadline = time.time() + 120
    while not state.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert state.is_file(), proc.stderr.read() if proc.poll() is not None else "no checkpoint within 120 s"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert "the last checkpoint (step" in last and f"--resume {out / 'train_state'}" in last
    step = json.loads(state.read_text())["step"]
    assert step >= 1 and f"(step {step})" in last
    assert not (out / "adapter_model.safetensors").exists()  # the final adapter is written only at the end


# ---- several processes ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def processes_run(case: str, out: Path, world: int, batch: int, accum: int = 1, timeout: int = 120):
    """`world` worker processes joined in one gloo group: [(exit code, stdout, stderr)] by rank."""
    env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world))
    procs = [subprocess.Popen([sys.executable, str(WORKER), case, str(out), "--batch-size", str(batch),
                               "--grad-accum", str(accum)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    results = []
    for p in procs:
        o, e = p.communicate(timeout=timeout)
        results.append((p.returncode, o, e))
    return results


@pytest.mark.parametrize("case", ["lora", "prefix"])
@pytest.mark.parametrize("accum", [1, 2])
def test_two_processes_train_as_one_with_twice_the_batch(case, accum, tmp_path):
    """2 gloo processes x batch 4 (x accumulation) == 1 process x batch 8 (x accumulation): after 3 steps the
    trained tensors agree within 1e-6 (the all-reduce averages the gradients; each micro-batch is weighted by
    its share of the global token count)."""
    results = processes_run(case, tmp_path / "two.safetensors", world=2, batch=4 // accum, accum=accum)
    assert all(code == 0 for code, _, _ in results), results
    one = ddp_worker.run(case, batch_size=8 // accum, grad_accum=accum, steps=3)
    two = load_file(str(tmp_path / "two.safetensors"))
    assert max_diff(one, two) < 1e-6
    assert max_diff(one, ddp_worker.run(case, batch_size=8 // accum, grad_accum=accum, steps=1)) > 1e-4  # it trains


def test_a_failing_process_ends_the_run_with_a_clear_error(tmp_path):
    """Rank 1 raises at its second step; rank 0, waiting in the gradient all-reduce, stops at once with
    PeerFailed (one line), instead of hanging until a timeout."""
    t0 = time.time()
    (code0, out0, _), (code1, _, err1) = processes_run("fail", tmp_path / "x.safetensors", world=2, batch=4)
    assert time.time() - t0 < 100
    assert code1 != 0 and "rank 1 fails on purpose" in err1
    assert code0 == 3 and "PeerFailed: process 0 of 2 lost contact with the others" in out0


def test_torchrun_command_line_trains_like_one_process(tiny_hf, text_file, tmp_path):
    """The real command line: `torchrun --standalone --nproc_per_node 2 -m techniques.lora train` for 2 steps of
    batch 2 per process saves the adapter that one process with batch 4 saves; only rank 0 prints."""
    torchrun = Path(sys.executable).parent / "torchrun"
    launcher = [str(torchrun)] if torchrun.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    args = ["-m", "techniques.lora", "train", "--weights", str(tiny_hf[2]), "--data", str(text_file),
            "--block-size", "16", "--device", "cpu", "--no-progress", "--precision", "fp32", "--max-steps", "2",
            "--lr", "1e-3"]
    two = subprocess.run([*launcher, "--standalone", "--nproc_per_node", "2", *args, "--batch-size", "2",
                          "--out", str(tmp_path / "two")], cwd=ROOT, env=clean_env(), capture_output=True,
                         text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("training 2 steps") == 1  # rank 0 alone prints
    assert "batch 2 x 2 processes = 4 examples per step" in two.stdout
    one = subprocess.run([sys.executable, *args, "--batch-size", "4", "--out", str(tmp_path / "one")], cwd=ROOT,
                         env=clean_env(), capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("one", "two"))
    assert max_diff(a, b) < 1e-6
    assert json.loads((tmp_path / "two" / "adapter_config.json").read_text()) == \
        json.loads((tmp_path / "one" / "adapter_config.json").read_text())


# ---- the frozen base in low precision ------------------------------------------------------------
def test_casting_the_frozen_linears_changes_nothing_under_autocast():
    """cast_frozen_linears stores frozen Linears as autocast would cast them: the loss and every gradient of the
    trained tensors are bit-identical to those of the fp32-stored model, for LoRA and for a prefix; the tied
    head (an Embedding's weight) and layers with trainable parameters stay fp32."""
    from minigpt import cast_frozen_linears, collate_lm
    batch = collate_lm(ddp_worker.examples()[:6])
    for technique in ("lora", "prefix"):
        results = []
        for cast in (False, True):
            torch.manual_seed(0)
            model = GPT(SMALL)
            if technique == "lora":
                model = lora_model(dropout=0.0)
                params, loss_fn = lora_parameters(model), lm_loss_fn(model)
            else:
                model.requires_grad_(False)
                prefix = PrefixTuning(SMALL, 3, projection=True, hidden_size=8)
                params = list(prefix.parameters())
                loss_fn = lm_loss_fn(model, past_fn=lambda B: (prefix.past_key_values(B), 3))
            n = cast_frozen_linears(model, torch.bfloat16) if cast else 0
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(batch)
            results.append((loss.item(), torch.autograd.grad(loss, params), n, model))
        (l0, g0, _, _), (l1, g1, n, cast_model) = results
        assert l0 == l1 and all(torch.equal(a, b) for a, b in zip(g0, g1))
        assert n == 4 * SMALL.n_layer  # c_attn, attn.c_proj, c_fc, mlp.c_proj (LoRA's frozen bases among them)
        assert cast_model.transformer.wte.weight.dtype == torch.float32  # the tied head stays fp32
        assert all(p.dtype == torch.float32 for p in params)
