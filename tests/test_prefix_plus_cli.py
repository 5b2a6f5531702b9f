"""Prefix-Tuning+ end to end: `python -m techniques.prefix train --variant plus` (files, exact resume, bf16),
generation with `minigpt generate --prefix` (greedy, sampling, beam; CLI tokens = library tokens), left padding with
a KV cache, and the bad-input policy (one clear error each)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from minigpt import beam_search, generate, left_pad
from minigpt.__main__ import main as minigpt_main
from techniques.prefix import (PLUS_CONFIG, PLUS_WEIGHTS, PrefixTuning, PrefixTuningPlus, load_adapter,
                               load_checkpoint, load_prefix_plus, save_adapter, save_prefix_plus)
from techniques.prefix.__main__ import main


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    return path


def plus_cli(folder, data, out, *extra):
    return main(["train", "--variant", "plus", "--weights", str(folder), "--data", str(data), "--block-size", "16",
                 "--batch-size", "3", "--device", "cpu", "--no-progress", "--out", str(out), *extra])


def one_error_line(code, capsys, *words) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


def nonzero_M(model, seed=0, scale=50.0):
    """A copy of `model` wrapped with Prefix-Tuning+ (the paper's φ = elu) whose M's are random (M = 0 would be the
    base model). The tiny model's queries are small (weights of std 0.02), and elu(q) ≈ q there, so M must be large
    for the term to change the greedy text."""
    pp = PrefixTuningPlus(copy.deepcopy(model), feature_map="elu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for M in pp.trainable_parameters():
            M.copy_(torch.randn(M.shape, generator=g) * scale)
    return pp


# ---- training --------------------------------------------------------------------------------------
def test_plus_train_writes_the_folder(tiny_hf, text_file, tmp_path, capsys):
    _, model, folder = tiny_hf
    assert plus_cli(folder, text_file, tmp_path / "a", "--max-steps", "6", "--layers", "0", "--phi", "gelu",
                    "--lr", "2e-2", "--precision", "fp32", "--eval-fraction", "0") == 0
    out = capsys.readouterr().out
    nh, hs = model.config.n_head, model.config.n_embd // model.config.n_head
    assert f"Prefix-Tuning+ φ=gelu, layers [0]: {nh * hs * hs:,} trainable parameters" in out
    assert (tmp_path / "a" / PLUS_CONFIG).is_file() and (tmp_path / "a" / PLUS_WEIGHTS).is_file()
    assert (tmp_path / "a" / "history.json").is_file()
    pp = load_prefix_plus(copy.deepcopy(model), tmp_path / "a")
    assert pp.layers == [0] and pp.feature_map == "gelu"
    assert pp.trainable_parameters()[0].abs().max() > 0  # it trained
    assert len(json.loads((tmp_path / "a" / "history.json").read_text())["history"]) == 6
    # --init-from: a new run from the trained M's, with their φ and layers
    assert plus_cli(folder, text_file, tmp_path / "b", "--max-steps", "1", "--init-from", str(tmp_path / "a"),
                    "--lr", "2e-2", "--precision", "fp32", "--eval-fraction", "0") == 0
    assert "Prefix-Tuning+ φ=gelu, layers [0]" in capsys.readouterr().out
    assert load_prefix_plus(copy.deepcopy(model), tmp_path / "b").layers == [0]


def test_plus_train_resume_is_exact(tiny_hf, text_file, tmp_path):
    """A 4-step run checkpoints at step 3; --resume from it gives the uninterrupted run's M's to the bit."""
    folder = tiny_hf[2]
    common = ["--max-steps", "4", "--precision", "fp32", "--grad-accum", "2"]
    assert plus_cli(folder, text_file, tmp_path / "a", *common, "--save-every", "3") == 0
    assert plus_cli(folder, text_file, tmp_path / "b", *common, "--resume", str(tmp_path / "a" / "train_state")) == 0
    a, b = (load_file(str(tmp_path / d / PLUS_WEIGHTS)) for d in "ab")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().max() > 0 for k in a)


def test_plus_train_bf16_runs(tiny_hf, text_file, tmp_path):
    _, model, folder = tiny_hf
    assert plus_cli(folder, text_file, tmp_path / "a", "--max-steps", "2", "--precision", "bf16") == 0
    M = load_file(str(tmp_path / "a" / PLUS_WEIGHTS))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() and t.abs().max() > 0 for t in M.values())


# ---- generation -------------------------------------------------------------------------------------
def test_generate_cli_runs_a_plus_folder(tiny_hf, tmp_path, tokenizer, capsys):
    """greedy, sampling and beam search through `minigpt generate --prefix DIR` print the library's tokens."""
    _, base, folder = tiny_hf
    pp = nonzero_M(base)
    save_prefix_plus(pp, tmp_path / "plus")
    ids = torch.tensor([tokenizer.encode("The dog")])
    common = ["generate", "The dog", "--weights", str(folder), "--prefix", str(tmp_path / "plus"), "--device", "cpu",
              "--max-new-tokens", "6"]
    assert minigpt_main([*common, "--greedy"]) == 0
    greedy = generate(pp.model, ids, max_new_tokens=6)
    assert capsys.readouterr().out == tokenizer.decode(greedy[0]) + "\n"
    assert not torch.equal(greedy, generate(base, ids, max_new_tokens=6))  # the M's change the text
    assert minigpt_main([*common, "--seed", "3", "--temperature", "1.0"]) == 0
    sampled = generate(pp.model, ids, max_new_tokens=6, do_sample=True, temperature=1.0, pad_token_id=50256,
                       generator=torch.Generator().manual_seed(3))
    assert capsys.readouterr().out == tokenizer.decode(sampled[0]) + "\n"
    assert minigpt_main([*common, "--num-beams", "3"]) == 0
    beams = beam_search(pp.model, ids, num_beams=3, max_new_tokens=6)
    assert tokenizer.decode(beams.sequences[0]) in capsys.readouterr().out


def test_generate_with_zero_M_is_the_base_text(tiny_hf, tmp_path, tokenizer, capsys):
    _, base, folder = tiny_hf
    save_prefix_plus(PrefixTuningPlus(copy.deepcopy(base)), tmp_path / "zero")
    common = ["generate", "The dog", "--weights", str(folder), "--device", "cpu", "--max-new-tokens", "6", "--greedy"]
    assert minigpt_main([*common, "--prefix", str(tmp_path / "zero")]) == 0
    with_plus = capsys.readouterr().out
    assert minigpt_main(common) == 0
    assert with_plus == capsys.readouterr().out


def test_left_padded_kv_cache_decoding_equals_full_passes(tiny_hf):
    """Batched, left-padded, token-by-token decoding with Prefix-Tuning+ gives each row's logits of one full pass."""
    _, base, _ = tiny_hf
    pp = nonzero_M(base, seed=1)
    rows = [[464, 3290, 318, 257, 922], [40, 588], [13, 50, 60, 70]]
    ids, mask = left_pad(rows, pad_id=50256)
    T = ids.size(1)
    with torch.no_grad():
        # prefill all but the last 2 columns, then one column at a time through the cache
        out = pp.model(ids[:, :T - 2], attention_mask=mask[:, :T - 2])
        steps = [out.logits]
        past = out.past_key_values
        for t in range(T - 2, T):
            out = pp.model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=past)
            steps.append(out.logits)
            past = out.past_key_values
        incremental = torch.cat(steps, dim=1)
        for b, r in enumerate(rows):
            full = pp.model(torch.tensor([r])).logits[0]
            got = incremental[b, T - len(r):]
            assert (got - full).abs().max().item() < 1e-4


# ---- bad input ---------------------------------------------------------------------------------------
def test_loaders_refuse_the_other_kind(tiny_hf, tmp_path):
    _, base, _ = tiny_hf
    save_prefix_plus(PrefixTuningPlus(copy.deepcopy(base)), tmp_path / "plus")
    save_adapter(PrefixTuning(base.config, 3), tmp_path / "prefix")
    for load in (load_adapter, load_checkpoint):
        with pytest.raises(ValueError, match="holds a Prefix-Tuning\\+ adapter .*load_prefix_plus"):
            load(base, tmp_path / "plus")
    with pytest.raises(ValueError, match="holds a peft adapter .*not a Prefix-Tuning\\+ one"):
        load_prefix_plus(copy.deepcopy(base), tmp_path / "prefix")


def test_plus_folder_for_another_model_size(tiny_hf, tmp_path):
    from minigpt import GPT, GPTConfig
    _, base, _ = tiny_hf
    other = GPT(GPTConfig(vocab_size=base.config.vocab_size, n_positions=32, n_embd=32, n_layer=3, n_head=2))
    save_prefix_plus(PrefixTuningPlus(other), tmp_path / "other")
    with pytest.raises(ValueError, match="another model size"):
        load_prefix_plus(copy.deepcopy(base), tmp_path / "other")


@pytest.mark.parametrize("extra, words", [
    (["--phi", "relu"], ["unknown --phi 'relu'", "elu, gelu"]),
    (["--layers", "0,9"], ["--layers '0,9'", "out of range", "layers"]),
    (["--layers", "x"], ["--layers 'x'", "0,2,4-7"]),
    (["--num-virtual-tokens", "4"], ["--num-virtual-tokens belong to prefix tuning"]),
])
def test_plus_train_bad_options_are_one_clear_error(tiny_hf, text_file, tmp_path, capsys, extra, words):
    code = plus_cli(tiny_hf[2], text_file, tmp_path / "o", "--max-steps", "1", *extra)
    one_error_line(code, capsys, *words)
    assert not (tmp_path / "o" / PLUS_CONFIG).exists()


def test_prefix_variant_refuses_plus_options(tiny_hf, text_file, tmp_path, capsys):
    code = main(["train", "--weights", str(tiny_hf[2]), "--data", str(text_file), "--out", str(tmp_path / "o"),
                 "--device", "cpu", "--block-size", "16", "--phi", "elu"])
    one_error_line(code, capsys, "--phi belong to Prefix-Tuning+", "--variant plus")
    code = main(["train", "--variant", "plux", "--weights", str(tiny_hf[2]), "--data", str(text_file),
                 "--out", str(tmp_path / "o")])
    one_error_line(code, capsys, "unknown --variant 'plux'")


def test_generate_cli_plus_folder_for_another_size_is_one_line(tiny_hf, tmp_path, capsys):
    from minigpt import GPT, GPTConfig
    other = GPT(GPTConfig(vocab_size=tiny_hf[1].config.vocab_size, n_positions=32, n_embd=32, n_layer=3, n_head=2))
    save_prefix_plus(PrefixTuningPlus(other), tmp_path / "other")
    code = minigpt_main(["generate", "Hi", "--weights", str(tiny_hf[2]), "--prefix", str(tmp_path / "other"),
                         "--device", "cpu", "--max-new-tokens", "2"])
    one_error_line(code, capsys, "another model size")


def test_check_refuses_a_plus_folder_with_the_reason(tiny_hf, tmp_path, capsys):
    save_prefix_plus(PrefixTuningPlus(copy.deepcopy(tiny_hf[1])), tmp_path / "plus")
    code = minigpt_main(["check", "--weights", str(tiny_hf[2]), "--prefix", str(tmp_path / "plus"), "--device", "cpu"])
    one_error_line(code, capsys, "Prefix-Tuning+", "peft has no such adapter type")


def test_plus_adapter_is_not_a_training_checkpoint(tiny_hf, text_file, tmp_path, capsys):
    save_prefix_plus(PrefixTuningPlus(copy.deepcopy(tiny_hf[1])), tmp_path / "plus")
    code = plus_cli(tiny_hf[2], text_file, tmp_path / "o", "--resume", str(tmp_path / "plus"))
    one_error_line(code, capsys, "not a training checkpoint", "--init-from", "--save-every")
    code = plus_cli(tiny_hf[2], text_file, tmp_path / "o", "--init-from", str(tmp_path / "plus"), "--phi", "gelu")
    one_error_line(code, capsys, "its own φ and layers", "--phi")


def test_generate_cli_composes_with_lora(tiny_hf, tmp_path, tokenizer, capsys):
    """`generate --lora A --prefix PLUS`: LoRA merged, then the attentions wrapped; the library's tokens."""
    from techniques.lora import apply_lora, merge_lora, save_adapter as save_lora
    _, base, folder = tiny_hf
    adapted = apply_lora(copy.deepcopy(base), r=4, alpha=8, verbose=False)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith(".B"):
                p.normal_(0, 0.5)  # B = 0 would make LoRA a no-op
    save_lora(adapted, tmp_path / "lora")
    save_prefix_plus(nonzero_M(base, seed=2), tmp_path / "plus")
    both = load_prefix_plus(merge_lora(adapted), tmp_path / "plus").model
    ids = torch.tensor([tokenizer.encode("The dog")])
    want = generate(both, ids, max_new_tokens=6)
    assert minigpt_main(["generate", "The dog", "--weights", str(folder), "--lora", str(tmp_path / "lora"),
                         "--prefix", str(tmp_path / "plus"), "--greedy", "--max-new-tokens", "6",
                         "--device", "cpu"]) == 0
    assert capsys.readouterr().out == tokenizer.decode(want[0]) + "\n"
