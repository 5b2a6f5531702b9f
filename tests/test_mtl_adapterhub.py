"""MTL-LoRA in `adapters`' own files (techniques/lora/mtl_adapterhub.py), both ways: the folders its save_adapter
writes load here, ours load there, and the logits per task are equal (a mixed-task batch, 1e-5)."""
from __future__ import annotations

import copy

import pytest
import torch

from techniques.lora import (apply_mtl_lora, load_adapterhub_mtl, mtl_modules, save_adapterhub_mtl, task_ids)
from test_mtl_lora import MLP_TARGETS, TASKS, _adapters_mtl

pytest.importorskip("adapters")


def _logits(hf, ours, x, ids):
    with torch.no_grad():
        theirs = hf(x, task_ids=ids).logits
        with task_ids(ours, ids):
            return theirs, ours(x).logits


def test_adapters_folders_load_here(tiny_hf, tmp_path):
    _, ours0, folder = tiny_hf
    hf = _adapters_mtl(folder, n_up=3, tau=0.7)
    torch.manual_seed(4)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if ".loras." in name or "shared_parameters" in name:
                p.copy_(torch.randn_like(p) * (0.3 if "weights" not in name else 1.0))
    for task in TASKS:
        hf.save_adapter(str(tmp_path / task), task, use_safetensors=True)
    ours, tasks = load_adapterhub_mtl(copy.deepcopy(ours0).eval(), [tmp_path / t for t in TASKS])
    assert tasks == list(TASKS) and len(mtl_modules(ours)) == 4
    x, ids = torch.randint(0, 50257, (3, 8)), torch.tensor([2, 0, 1])
    theirs, mine = _logits(hf, ours, x, ids)
    diff = float((theirs - mine).abs().max())
    print(f"\nadapters' save_adapter folders -> ours: max |logits diff| over 3 tasks = {diff:.2e}")
    assert diff < 1e-5
    with torch.no_grad():
        assert float((mine - ours0(x).logits).abs().max()) > 1e-2


def test_our_folders_load_in_adapters(tiny_hf, tmp_path):
    import adapters
    import adapters.composition as ac
    from transformers import GPT2LMHeadModel
    _, ours0, folder = tiny_hf
    torch.manual_seed(5)
    ours = apply_mtl_lora(copy.deepcopy(ours0).eval(), n_tasks=3, targets=MLP_TARGETS, r=4, alpha=8, n_up=3,
                          tau=0.7)
    with torch.no_grad():
        for m in mtl_modules(ours):
            for p in (m.A, m.Lambda, m.B, m.w):
                p.copy_(torch.randn_like(p) * 0.3)
    dirs = save_adapterhub_mtl(ours, tmp_path / "hub", TASKS)
    assert not list(tmp_path.glob(".tmp-save-*"))
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    adapters.init(hf)
    for d in dirs:
        hf.load_adapter(str(d), use_safetensors=True)
    hf.share_parameters(adapter_names=list(TASKS))
    hf.active_adapters = ac.MultiTask(*TASKS)
    x, ids = torch.randint(0, 50257, (3, 8)), torch.tensor([1, 2, 0])
    theirs, mine = _logits(hf, ours, x, ids)
    diff = float((theirs - mine).abs().max())
    print(f"\nours -> adapters' load_adapter: max |logits diff| over 3 tasks = {diff:.2e}")
    assert diff < 1e-5
    back, _ = load_adapterhub_mtl(copy.deepcopy(ours0).eval(), dirs)       # and back here, exactly
    for a, b in zip(mtl_modules(ours), mtl_modules(back)):
        assert all(torch.equal(getattr(a, p), getattr(b, p)) for p in ("A", "Lambda", "B", "w"))


def test_what_the_format_cannot_hold_is_refused(tiny_hf, tmp_path):
    _, ours0, folder = tiny_hf
    full = apply_mtl_lora(copy.deepcopy(ours0), n_tasks=2, targets=MLP_TARGETS, r=2, full_lambda=True)
    with pytest.raises(ValueError, match="cannot hold a full Λ_t"):
        save_adapterhub_mtl(full, tmp_path / "x", ["a", "b"])
    attn = apply_mtl_lora(copy.deepcopy(ours0), n_tasks=2, targets=("c_attn",), r=2)
    with pytest.raises(ValueError, match="only mlp.c_fc and mlp.c_proj, not transformer.h.0.attn.c_attn"):
        save_adapterhub_mtl(attn, tmp_path / "x", ["a", "b"])
    assert not (tmp_path / "x").exists()
    hf = _adapters_mtl(folder, n_up=2, tau=1.0)
    hf.save_adapter(str(tmp_path / "pickled"), TASKS[0])                    # its default: pytorch_adapter.bin
    with pytest.raises(FileNotFoundError, match="pickled pytorch_adapter.bin, which is never unpickled"):
        load_adapterhub_mtl(copy.deepcopy(ours0), [tmp_path / "pickled"])
    ok = apply_mtl_lora(copy.deepcopy(ours0), n_tasks=2, targets=MLP_TARGETS, r=2)
    dirs = save_adapterhub_mtl(ok, tmp_path / "a", ["a", "b"])
    other = apply_mtl_lora(copy.deepcopy(ours0), n_tasks=2, targets=MLP_TARGETS, r=2)   # another random A
    save_adapterhub_mtl(other, tmp_path / "b", ["c", "d"])
    with pytest.raises(ValueError, match="differs from task 'a'.*shared by the tasks of one MTL-LoRA"):
        load_adapterhub_mtl(copy.deepcopy(ours0), [dirs[0], tmp_path / "b" / "d"])
