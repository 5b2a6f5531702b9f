"""Loading and saving Hugging Face GPT-2 checkpoints, every layout and every error."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import make_hf_model
from minigpt import GPT, generate
from minigpt import pretrained

ROOT = Path(__file__).resolve().parents[1]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def hf_and_ids(tmp_path_factory):
    hf, folder = make_hf_model(tmp_path_factory.mktemp("src"), seed=3)
    return hf, folder, torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(0))


def test_save_pretrained_round_trips_through_transformers(hf_and_ids, tmp_path):
    from transformers import GPT2LMHeadModel
    hf, folder, ids = hf_and_ids
    ours = GPT.from_pretrained(str(folder))
    ours.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)
    assert torch.equal(logits(GPT.from_pretrained(str(tmp_path / "out")), ids), logits(ours, ids))


def test_raw_hub_key_layout_loads(hf_and_ids, tmp_path):
    """The public hub files have no `transformer.` prefix and carry attn.bias mask buffers."""
    hf, folder, ids = hf_and_ids
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    n = hf.config.n_positions
    for i in range(hf.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with torch.no_grad():
        assert (logits(GPT.from_pretrained(str(tmp_path)), ids) - hf(ids).logits).abs().max() < 1e-5


def test_pytorch_model_bin_and_sharded_index(hf_and_ids, tmp_path):
    hf, folder, ids = hf_and_ids
    want = logits(GPT.from_pretrained(str(folder)), ids)
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    bin_dir, shard_dir = tmp_path / "bin", tmp_path / "shards"
    for d in (bin_dir, shard_dir):
        d.mkdir()
        (d / "config.json").write_text((folder / "config.json").read_text())
    torch.save(sd, bin_dir / "pytorch_model.bin")
    assert torch.equal(logits(GPT.from_pretrained(str(bin_dir)), ids), want)
    keys = sorted(k for k in sd if k != "lm_head.weight")
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in halves.items():
        save_file({k: sd[k].contiguous() for k in ks}, shard_dir / name)
    index = {"weight_map": {k: name for name, ks in halves.items() for k in ks}}
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    assert torch.equal(logits(GPT.from_pretrained(str(shard_dir)), ids), want)


def test_pickled_code_is_refused(tmp_path, hf_and_ids):
    _, folder, _ = hf_and_ids
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="weights_only=True"):
        GPT.from_pretrained(str(tmp_path))


def test_untransposed_square_c_proj_is_caught_by_values(hf_and_ids):
    """attn.c_proj is square, so only values can catch a missing transpose."""
    hf, folder, ids = hf_and_ids
    model = GPT.from_pretrained(str(folder))
    sd = pretrained.hf_to_minigpt_state_dict(hf.state_dict(), {k: v.shape for k, v in model.state_dict().items()})
    w = model.transformer.h[0].attn.c_proj.weight
    assert w.shape[0] == w.shape[1] and not torch.equal(w, w.t())
    assert torch.equal(sd["transformer.h.0.attn.c_proj.weight"], hf.transformer.h[0].attn.c_proj.weight.t())


def test_mismatched_checkpoint_names_every_problem(hf_and_ids, tmp_path):
    hf, folder, _ = hf_and_ids
    sd = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    del sd["transformer.h.1.ln_2.bias"]
    sd["transformer.h.0.mlp.c_fc.weight"] = sd["transformer.h.0.mlp.c_fc.weight"][:, :10].contiguous()
    sd["transformer.extra.weight"] = torch.zeros(1)
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError) as e:
        GPT.from_pretrained(str(tmp_path))
    msg = str(e.value)
    assert "missing 1: transformer.h.1.ln_2.bias" in msg
    assert "unexpected 1: transformer.extra.weight" in msg
    assert "transformer.h.0.mlp.c_fc.weight: checkpoint [10, 32] vs model [128, 32]" in msg


def test_config_errors(tmp_path, hf_and_ids):
    _, folder, _ = hf_and_ids
    cfg = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "reorder_and_upcast_attn": True}))
    with pytest.raises(ValueError, match="reorder_and_upcast_attn"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    with pytest.raises(ValueError, match="tie_word_embeddings=false"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="only GPT-2"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        GPT.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither a folder nor a known model .tiny, gpt2"):
        GPT.from_pretrained(str(tmp_path / "nope"))


def test_damaged_weights_are_named(hf_and_ids, tmp_path):
    """A truncated or garbage model.safetensors: one ValueError naming the file, not safetensors' traceback."""
    _, folder, _ = hf_and_ids
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    data = (folder / "model.safetensors").read_bytes()
    for damaged in (data[:len(data) // 2], b"not a safetensors file at all", data[:5]):
        (tmp_path / "model.safetensors").write_bytes(damaged)
        with pytest.raises(ValueError, match="model.safetensors is damaged and cannot be read"):
            GPT.from_pretrained(str(tmp_path))


def test_adapter_folder_is_not_a_model(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(FileNotFoundError, match="is a LORA adapter, not a model.*--lora"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(FileNotFoundError, match="--prefix"):
        GPT.from_pretrained(str(tmp_path))


def test_half_precision_files_load_as_float32(hf_and_ids, tmp_path):
    """The bundled model is stored in float16; from_pretrained gives float32 unless asked otherwise."""
    hf, folder, ids = hf_and_ids
    model = GPT.from_pretrained(str(folder))
    model.half().save_pretrained(tmp_path)
    back = GPT.from_pretrained(str(tmp_path))
    assert all(p.dtype == torch.float32 for p in back.parameters())
    assert back.lm_head.weight is back.transformer.wte.weight
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a.float(), b), name
    assert GPT.from_pretrained(str(tmp_path), dtype=torch.float16).transformer.wte.weight.dtype == torch.float16


def test_save_is_atomic(hf_and_ids, tmp_path, monkeypatch):
    _, folder, _ = hf_and_ids
    model = GPT.from_pretrained(str(folder))

    def crash(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(pretrained, "save_tensors", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no config.json without its weights, and no leftovers


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=120)


def test_name_resolves_through_hub_cache_offline(hf_and_ids, tmp_path):
    """A model in the Hugging Face cache (as transformers leaves it) loads by name, offline."""
    _, folder, ids = hf_and_ids
    snap = tmp_path / "hub" / "models--openai-community--gpt2" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        (snap / f).write_bytes((folder / f).read_bytes())
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    code = ("import torch; from minigpt import GPT; m = GPT.from_pretrained('gpt2'); "
            f"print(m(torch.tensor({ids.tolist()})).logits.sum().item())")
    r = _run(code, {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert abs(float(r.stdout) - logits(GPT.from_pretrained(str(folder)), ids).sum().item()) < 1e-2


def test_name_missing_offline_gives_one_clear_message(tmp_path):
    r = _run("from minigpt import GPT; GPT.from_pretrained('gpt2-medium')",
             {"HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert r.returncode != 0
    assert "not in the Hugging Face cache" in r.stderr and "--weights DIR" in r.stderr


def _cached_gpt2() -> str | None:
    try:
        from huggingface_hub import snapshot_download
        for repo in ("openai-community/gpt2", "gpt2"):
            try:
                return snapshot_download(repo, allow_patterns=["config.json", "model.safetensors"],
                                         local_files_only=True)
            except Exception:
                continue
    except ImportError:
        pass
    return None


@pytest.mark.skipif(_cached_gpt2() is None, reason="the real GPT-2 weights are not in the local Hugging Face "
                                                   "cache (no network here); run where `gpt2` is cached")
def test_real_gpt2_greedy_matches_transformers_fixture():
    model = GPT.from_pretrained("gpt2")
    out = generate(model, torch.tensor([[464, 3290]]), max_new_tokens=18)
    assert out[0].tolist() == [464, 3290, 373, 1043, 287, 257, 2214, 1474, 262, 16246, 286, 2688, 290, 2688,
                               27262, 13, 198, 198, 464, 3290]
