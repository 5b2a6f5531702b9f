"""MTL-LoRA (techniques/lora/mtl.py): properties against the paper's equation (arXiv:2410.09437),
h = W0·x + b + s·Σ_i softmax(w_t/τ)_i·B^i·Λ_t·A·x, and the task-id plumbing on a GPT-2-shaped model."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from techniques.lora import LoRALinear, MTLLoRALinear, apply_mtl_lora, mtl_modules, set_task_ids, task_ids

dims = st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(2, 6), st.integers(1, 3), st.booleans(),
                 st.integers(0, 2**16))


def _layer(n_tasks, r, n_up, full, seed, randomise=True):
    torch.manual_seed(seed)
    m = MTLLoRALinear(nn.Linear(5, 7), n_tasks, r=r, alpha=2 * r, n_up=n_up, tau=0.7, full_lambda=full)
    if randomise:
        with torch.no_grad():
            for p in (m.Lambda, m.B, m.w):
                p.copy_(torch.randn_like(p))
    return m


def _paper(m: MTLLoRALinear, x: torch.Tensor, t: int) -> torch.Tensor:
    """The equation as the paper writes it, one example (T, in), one task t, by a Python sum over i."""
    lam = m.lambda_matrix()[t]
    mix = torch.softmax(m.w[t] / m.tau, dim=-1)
    delta = sum(mix[i] * (m.B[i] @ lam @ m.A @ x.T).T for i in range(m.n_up))
    return m.base(x) + m.scaling * delta


@given(dims)
def test_forward_is_the_papers_equation_per_row(d):
    n_tasks, batch, r, n_up, full, seed = d
    m = _layer(n_tasks, r, n_up, full, seed)
    x = torch.randn(batch, 3, 5)
    ids = torch.randint(0, n_tasks, (batch,))
    m.task_ids = ids
    y = m(x)
    for b in range(batch):  # a mixed-task batch = each row computed alone with its own task
        torch.testing.assert_close(y[b], _paper(m, x[b], int(ids[b])), atol=1e-5, rtol=1e-5)


@given(dims)
def test_init_is_the_base_exactly(d):
    n_tasks, batch, r, n_up, full, seed = d
    m = _layer(n_tasks, r, n_up, full, seed, randomise=False)
    assert torch.equal(m.lambda_matrix(), torch.eye(r).expand(n_tasks, r, r)) and not m.B.any()
    x = torch.randn(batch, 3, 5)
    m.task_ids = torch.randint(0, n_tasks, (batch,))
    assert torch.equal(m(x), m.base(x))


@given(dims)
def test_one_task_one_up_identity_lambda_is_plain_lora(d):
    _, batch, r, _, full, seed = d
    m = _layer(1, r, 1, full, seed)
    with torch.no_grad():
        m.Lambda.copy_(torch.eye(r)[None] if full else torch.ones(1, r))
        m.w.copy_(torch.randn_like(m.w) * 10)  # one up-projection: the weights cannot matter
    lora = LoRALinear(m.base, r=r, alpha=m.alpha)
    with torch.no_grad():
        lora.A.copy_(m.A)
        lora.B.copy_(m.B[0])
    x = torch.randn(batch, 3, 5)
    m.task_ids = torch.zeros(batch, dtype=torch.long)
    torch.testing.assert_close(m(x), lora(x), atol=1e-5, rtol=1e-5)


def test_model_task_ids_and_bad_ids(tiny_hf):
    _, ours, _ = tiny_hf
    model = apply_mtl_lora(copy.deepcopy(ours).eval(), n_tasks=3, r=4, n_up=2)
    assert len(mtl_modules(model)) > 0
    with torch.no_grad():
        for m in mtl_modules(model):
            m.B.normal_()
            m.Lambda.normal_()  # at init Λ_t = I for every task: make the tasks differ
    x = torch.randint(0, 50257, (3, 8))
    with torch.no_grad():
        with task_ids(model, [0, 1, 2]):
            mixed = model(x).logits                                  # (3, T, vocab), three tasks in one batch
        for b in range(3):
            set_task_ids(model, [b])
            torch.testing.assert_close(mixed[b:b + 1], model(x[b:b + 1]).logits, atol=1e-5, rtol=1e-5)
        set_task_ids(model, [0])
        o0 = model(x[:1]).logits
        set_task_ids(model, [1])
        assert not torch.allclose(o0, model(x[:1]).logits)          # the task id changes the output
    with pytest.raises(ValueError, match="out of range"):
        set_task_ids(model, [0, 3])
    set_task_ids(model, None)
    with pytest.raises(RuntimeError, match="set_task_ids"):
        model(x)


# ---- initialisation as the official code (pUmpKin-Co/MTL-LoRA src/adapter/mlora.py:86-95) -------------------
@given(dims)
def test_init_follows_the_official_code(d):
    n_tasks, _, r, n_up, full, seed = d
    base = nn.Linear(5, 7)
    torch.manual_seed(seed)
    m = MTLLoRALinear(base, n_tasks, r=r, n_up=n_up, full_lambda=full)
    torch.manual_seed(seed)  # the same draws, in the same order, by the reference recipe
    A = torch.empty(r, 5)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    w = torch.empty(n_tasks, n_up)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    assert torch.equal(m.A, A) and torch.equal(m.w, w)
    assert float(m.w.detach().abs().max()) <= 1 / math.sqrt(n_up) + 1e-7         # U(-1/sqrt(n), 1/sqrt(n))
    assert float(m.A.detach().abs().max()) <= 1 / math.sqrt(5) + 1e-7            # U(-1/sqrt(in), 1/sqrt(in))
    assert torch.equal(m.lambda_matrix(), torch.eye(r).expand(n_tasks, r, r)) and not m.B.any()


def test_init_w_is_not_standard_normal():
    """The old init drew w ~ N(0, 1); the official code's bound is 1/sqrt(n): with n = 2 and 4000 draws, N(0, 1)
    would exceed 1/sqrt(2) about 1900 times."""
    torch.manual_seed(0)
    m = MTLLoRALinear(nn.Linear(5, 7), n_tasks=2000, r=2, n_up=2)
    assert float(m.w.detach().abs().max()) <= 1 / math.sqrt(2)
    assert abs(float(m.w.detach().std()) - 1 / math.sqrt(6)) < 0.02              # the std of U(-b, b) is b/sqrt(3)


# ---- against AdapterHub `adapters` (its MTLLoRAConfig, MultiTask composition) on a GPT-2-shaped model -------
# `adapters` 1.3 cannot put MTL-LoRA on GPT-2's attention: c_attn is its LoRAMergedLinear, which refuses a
# MultiTask setup (adapters/methods/lora.py:1285, "Cannot use MultiTask[...] with LoRA"), and attn.c_proj is not
# a LoRA target there. Its MLP layers (mlp.c_fc, mlp.c_proj) are LoRALinear and do MTL-LoRA, so the check adapts
# those. Only the diagonal Λ ("singular_values") is compared: its full Λ ("linear") cannot be built
# (TaskSpecificLinear.__init__ at lora.py:49 never calls nn.Module.__init__) and would compute Λᵀ·A·x.
TASKS = ("t0", "t1", "t2")
MLP_TARGETS = ("mlp.c_fc", "mlp.c_proj")


def _adapters_mtl(folder, n_up, tau):
    import adapters
    import adapters.composition as ac
    from adapters import MTLLoRAConfig
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    adapters.init(hf)
    cfg = MTLLoRAConfig(r=4, alpha=8, n_up_projection=n_up, weights_sharpness=tau, selfattn_lora=False,
                        intermediate_lora=True, output_lora=True)
    for name in TASKS:
        hf.add_adapter(name, cfg)
    hf.share_parameters(adapter_names=list(TASKS))
    hf.active_adapters = ac.MultiTask(*TASKS)
    return hf


def _pairs(hf, ours):
    """(adapters' LoRALinear layer, our MTLLoRALinear) for each adapted MLP layer, matched by module name."""
    theirs = dict(hf.named_modules())
    return [(theirs[name], mod) for name, mod in ours.named_modules() if isinstance(mod, MTLLoRALinear)]


def _copy_theirs_to_ours(hf, ours):
    with torch.no_grad():
        for layer, m in _pairs(hf, ours):
            shared = layer.shared_parameters[",".join(TASKS)]
            m.A.copy_(shared["lora_A"])                                    # (r, in)
            m.B.copy_(shared["lora_B"])                                    # (n, out, r)
            for t, name in enumerate(TASKS):
                m.Lambda[t].copy_(layer.loras[name].task_specific.values)  # diag(Λ_t) (r,)
                m.w[t].copy_(layer.loras[name].weights)                    # w_t (n,)


def _copy_ours_to_theirs(ours, hf):
    with torch.no_grad():
        for layer, m in _pairs(hf, ours):
            shared = layer.shared_parameters[",".join(TASKS)]
            shared["lora_A"].copy_(m.A)
            shared["lora_B"].copy_(m.B)
            for t, name in enumerate(TASKS):
                layer.loras[name].task_specific.values.copy_(m.Lambda[t])
                layer.loras[name].weights.copy_(m.w[t])


@pytest.mark.parametrize("direction", ["adapters->ours", "ours->adapters"])
def test_logits_equal_adapters_mtl_lora_per_task(tiny_hf, direction):
    _, ours0, folder = tiny_hf
    n_up, tau = 3, 0.7
    hf = _adapters_mtl(folder, n_up, tau)
    torch.manual_seed(3)
    ours = apply_mtl_lora(copy.deepcopy(ours0).eval(), n_tasks=3, targets=MLP_TARGETS, r=4, alpha=8, n_up=n_up,
                          tau=tau)
    assert len(_pairs(hf, ours)) == 4
    with torch.no_grad():
        if direction == "adapters->ours":
            for name, p in hf.named_parameters():                          # random A, B^i, Λ_t, w in adapters
                if ".loras." in name or "shared_parameters" in name:
                    p.copy_(torch.randn_like(p) * (0.3 if "weights" not in name else 1.0))
            _copy_theirs_to_ours(hf, ours)
        else:
            for m in mtl_modules(ours):
                for p in (m.A, m.Lambda, m.B):
                    p.copy_(torch.randn_like(p) * 0.3)
            _copy_ours_to_theirs(ours, hf)
    x = torch.randint(0, 50257, (3, 8))
    ids = torch.tensor([2, 0, 1])                                          # a mixed-task batch
    with torch.no_grad():
        theirs = hf(x, task_ids=ids).logits
        with task_ids(ours, ids):
            mine = ours(x).logits
        base = ours0(x).logits
    diff = float((theirs - mine).abs().max())
    print(f"\n{direction}: max |logits(adapters) - logits(ours)| over 3 tasks = {diff:.2e}")
    assert diff < 1e-5
    assert float((mine - base).abs().max()) > 1e-2                         # the adapters really change the logits
    for t in range(3):                                                     # and each task is its own function
        with torch.no_grad():
            theirs_t = hf(x[:1], task_ids=torch.tensor([t])).logits
            set_task_ids(ours, [t])
            torch.testing.assert_close(ours(x[:1]).logits, theirs_t, atol=1e-5, rtol=0)
    set_task_ids(ours, None)


# ---- files: save_mtl_lora / load_mtl_lora, and the refusals between LoRA and MTL-LoRA folders ---------------
def _trained_like(ours0, full=False):
    torch.manual_seed(5)
    model = apply_mtl_lora(copy.deepcopy(ours0).eval(), n_tasks=3, targets=("c_attn", "mlp.c_fc"), r=4, n_up=2,
                           tau=0.5, full_lambda=full)
    with torch.no_grad():
        for m in mtl_modules(model):
            for p in (m.A, m.Lambda, m.B, m.w):
                p.copy_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("full", [False, True])
def test_save_load_round_trip_and_merge(tiny_hf, tmp_path, full):
    from techniques.lora import load_mtl_lora, merge_mtl_lora, save_mtl_lora
    _, ours0, _ = tiny_hf
    model = _trained_like(ours0, full)
    save_mtl_lora(model, tmp_path / "mtl", ["poetry", "scifi", "chemistry"])
    assert not list(tmp_path.glob(".tmp-save-*"))
    loaded, tasks = load_mtl_lora(copy.deepcopy(ours0).eval(), tmp_path / "mtl")
    assert tasks == ["poetry", "scifi", "chemistry"]
    x = torch.randint(0, 50257, (3, 8))
    with torch.no_grad():
        with task_ids(model, [0, 1, 2]):
            want = model(x).logits
        with task_ids(loaded, [0, 1, 2]):
            assert torch.equal(loaded(x).logits, want)
        for t in range(3):                                   # merging task t = the MTL model run with task t
            merged = merge_mtl_lora(copy.deepcopy(loaded), t)
            assert not mtl_modules(merged)
            torch.testing.assert_close(merged(x[t:t + 1]).logits, want[t:t + 1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        merge_mtl_lora(copy.deepcopy(loaded), 3)


def test_mtl_and_plain_lora_folders_refuse_each_other(tiny_hf, tmp_path):
    from techniques.lora import apply_lora, load_adapter, load_mtl_lora, save_adapter, save_mtl_lora, task_index
    from techniques.lora import read_mtl_config
    _, ours0, _ = tiny_hf
    save_mtl_lora(_trained_like(ours0), tmp_path / "mtl", ["a", "b", "c"])
    with pytest.raises(ValueError, match="'MTL_LORA' adapter, not 'LORA'.*--mtl-lora"):
        load_adapter(copy.deepcopy(ours0), tmp_path / "mtl")
    save_adapter(apply_lora(copy.deepcopy(ours0), r=2, verbose=False), tmp_path / "lora")
    with pytest.raises(ValueError, match="'LORA' adapter, not 'MTL_LORA'.*--lora"):
        load_mtl_lora(copy.deepcopy(ours0), tmp_path / "lora")
    cfg = read_mtl_config(tmp_path / "mtl")
    assert task_index(cfg, "b") == 1 and task_index(cfg, "2") == 2
    with pytest.raises(ValueError, match="unknown task 'poetry'.*a, b, c"):
        task_index(cfg, "poetry")
    with pytest.raises(ValueError, match="out of range"):
        task_index(cfg, 3)


def test_generate_command_lora_refuses_mtl_folder(tiny_hf, tmp_path, capsys):
    from minigpt.__main__ import main as minigpt_main
    from techniques.lora import save_mtl_lora
    _, ours0, folder = tiny_hf
    save_mtl_lora(_trained_like(ours0), tmp_path / "mtl", ["a", "b", "c"])
    code = minigpt_main(["generate", "Hello", "--weights", str(folder), "--lora", str(tmp_path / "mtl"),
                         "--max-new-tokens", "2", "--device", "cpu"])
    assert code == 2 and "MTL_LORA" in capsys.readouterr().err


def test_generate_command_with_mtl_folder_and_task(tiny_hf, tmp_path, capsys):
    """`minigpt generate --mtl-lora DIR --task NAME` = greedy decoding of the MTL model run with that task."""
    from minigpt.__main__ import main as minigpt_main
    from minigpt import get_tokenizer
    from techniques.lora import save_mtl_lora
    _, ours0, folder = tiny_hf
    model = _trained_like(ours0)
    with torch.no_grad():
        for m in mtl_modules(model):
            m.B.mul_(20)                                  # tasks far enough apart to change a greedy token
    save_mtl_lora(model, tmp_path / "mtl", ["a", "b", "c"])
    tok = get_tokenizer()
    ids = torch.tensor([tok.encode("Hello there")])
    outs = {}
    for t, name in enumerate("abc"):
        seq = ids
        with torch.no_grad(), task_ids(model, [t]):
            for _ in range(4):
                seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
        want = "Hello there" + tok.decode(seq[0, ids.shape[1]:].tolist())
        code = minigpt_main(["generate", "Hello there", "--weights", str(folder), "--mtl-lora", str(tmp_path / "mtl"),
                             "--task", name, "--greedy", "--max-new-tokens", "4", "--device", "cpu"])
        outs[name] = capsys.readouterr().out.strip()
        assert code == 0 and outs[name] == want.strip()
    assert len(set(outs.values())) > 1                     # the task changes the text
    code = minigpt_main(["generate", "Hi", "--weights", str(folder), "--mtl-lora", str(tmp_path / "mtl"),
                         "--task", "poetry", "--device", "cpu"])
    assert code == 2 and "unknown task 'poetry'" in capsys.readouterr().err
    code = minigpt_main(["generate", "Hi", "--weights", str(folder), "--task", "a", "--device", "cpu"])
    assert code == 2 and "--mtl-lora and --task go together" in capsys.readouterr().err


# ---- python -m techniques.lora train --mtl -------------------------------------------------------------------
def _cli(argv, capsys):
    from techniques.lora.__main__ import main
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _task_files(tmp_path):
    files = []
    for name, text in (("poetry", "the moon is bright upon the silent sea. "), ("scifi", "the starship jumped to "
                       "warp near the red dwarf. "), ("chem", "sodium reacts with water to give hydrogen. ")):
        f = tmp_path / f"{name}.txt"
        f.write_text(text * 12)
        files += ["--data", str(f)]
    return files


def test_cli_train_mtl_tiny_run_resume_exact_and_bad_tasks(tiny_hf, tmp_path, capsys):
    from safetensors.torch import load_file
    from techniques.lora import load_mtl_lora
    _, ours0, folder = tiny_hf
    data = _task_files(tmp_path)

    def run(out, *extra, tasks="poetry,scifi,chem"):
        return _cli(["train", "--mtl", "--tasks", tasks, *data, "--weights", str(folder), "--block-size", "16",
                     "--batch-size", "4", "--device", "cpu", "--no-progress", "--precision", "fp32", "--lr", "1e-2",
                     "--max-steps", "5", "--eval-fraction", "0.2", "--r", "2", "--n-up", "2",
                     "--out", str(tmp_path / out), *extra], capsys)
    code, out, err = run("a", "--save-every", "3")
    assert code == 0, err
    assert "3 tasks (poetry, scifi, chem)" in out and "saved MTL-LoRA" in out
    code, out, err = run("b", "--resume", str(tmp_path / "a" / "train_state"))   # the step-3 checkpoint
    assert code == 0 and "resuming from" in out, err
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)    # resumed == uninterrupted
    model, tasks = load_mtl_lora(copy.deepcopy(ours0).eval(), tmp_path / "a")
    assert tasks == ["poetry", "scifi", "chem"]
    m = mtl_modules(model)[0]
    assert m.B.abs().sum() > 0 and not torch.equal(m.Lambda[0], m.Lambda[1])  # trained, and per task
    hist = json.loads((tmp_path / "a" / "history.json").read_text())["history"]
    assert len(hist) == 5 and all(math.isfinite(h["loss"]) for h in hist)
    code, _, err = run("c", "--resume", str(tmp_path / "a" / "train_state"), "--n-up", "3")
    assert code == 2 and "n_up" in err                                        # another shape: refused
    for tasks, msg in (("poetry,scifi", "names 2 task(s) but 3 --data file(s)"),
                       ("poetry,poetry,chem", "distinct, non-empty names"), ("a,,b", "distinct, non-empty names")):
        code, _, err = run("d", tasks=tasks)
        assert code == 2 and msg in err, err
    code, _, err = run("e", "--dora")
    assert code == 2 and "--dora is not implemented for --mtl" in err
    code, _, err = _cli(["train", "--data", "x.txt", "--data", "y.txt", "--out", str(tmp_path / "f")], capsys)
    assert code == 2 and "several: --mtl" in err


def test_task_id_out_of_range_in_a_batch_is_refused(tiny_hf):
    from techniques.lora import TaskExample, collate_mtl, mtl_loss_fn
    _, ours0, _ = tiny_hf
    model = apply_mtl_lora(copy.deepcopy(ours0), n_tasks=2, r=2)
    batch = collate_mtl([TaskExample([1, 2, 3], [1, 1, 1], 0), TaskExample([4, 5, 6], [1, 1, 1], 2)])
    with pytest.raises(ValueError, match="task id 2 is out of range.*2 tasks"):
        mtl_loss_fn(model)(batch)
    assert all(m.task_ids is None for m in mtl_modules(model))
