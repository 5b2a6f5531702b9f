"""QLoRA (techniques/lora/nf4.py): the NF4 code book from its definition, the blockwise error bound, bitsandbytes'
storage byte for byte, the forward path's exactness, LoRA/DoRA training on a 4-bit base, merging, memory, the command.

bitsandbytes appears only here, as the reference."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import make_hf_model
from minigpt import (GPT, Example, GPTConfig, Linear, TrainConfig, cast_frozen_linears, collate_lm, lm_loss_fn,
                     packed_linear_available, train)
from techniques.lora import (NF4Linear, apply_lora, load_adapter, lora_modules, lora_parameters,
                             lora_summary, merge_lora, quantize_base)
from techniques.lora.__main__ import build_parser, main, run_info
from techniques.lora.nf4 import (DYNAMIC_CODE, NF4_CODE, dequantize_absmax, dequantize_nf4, dynamic_map, pack_nibbles,
                                 quantize_nf4, unpack_nibbles)

VOCAB = 1000
HALF_GAP = (NF4_CODE[1:] - NF4_CODE[:-1]).max().item() / 2            # 0.1385: the widest NF4 step, halved
HALF_GAP_8BIT = (DYNAMIC_CODE[1:] - DYNAMIC_CODE[:-1]).max().item() / 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("qlora"), seed=7, vocab_size=VOCAB)[1]


def batch(seed=0, B=2, T=12):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def nf4_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NF4Linear)]


# ---- the code books from their definitions --------------------------------------------------------------------
def test_nf4_code_book_is_the_papers():
    """Eq. (4) made asymmetric as in the paper's code: quantiles of N(0, 1) at 9 points evenly spaced from `offset`
    to 1/2 (the last, 1/2, is the zero) for the positive half, 8 for the negative half, the two zeros merged, all
    divided by the largest. offset = 1 - (1/30 + 1/32)/2 (halfway between the outermost quantile edges of 15 and
    16 equal bins), bitsandbytes' create_normal_map(offset=0.9677083)."""
    assert abs(1 - (1 / 30 + 1 / 32) / 2 - 0.9677083) < 1e-7
    offset = 0.9677083                                                        # the constant, as the paper's code has it
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    positive = normal.icdf(torch.linspace(offset, 0.5, 9)[:-1].double())        # 8 values > 0
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8)[:-1].double())       # 7 values < 0
    values = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).float().sort().values
    want = values / values.max()
    torch.testing.assert_close(NF4_CODE, want, rtol=0, atol=6e-8)  # within one fp32 ulp of the definition
    assert NF4_CODE.dtype == torch.float32 and (NF4_CODE[1:] > NF4_CODE[:-1]).all()
    assert (NF4_CODE < 0).sum() == 7 and (NF4_CODE > 0).sum() == 8 and NF4_CODE[7] == 0
    assert NF4_CODE[0] == -1 and NF4_CODE[-1] == 1


def test_dynamic_8bit_code_is_its_definition():
    """Signed dynamic type: per exponent 10^-E (E = 0..6) 2^(6-E) magnitudes evenly spaced inside (10^-E/10, 10^-E),
    each with both signs, plus 0 and 1: 256 distinct sorted values."""
    code = dynamic_map()
    assert code.shape == (256,) and (code[1:] > code[:-1]).all() and code[0] > -1 and code[-1] == 1
    assert (code == 0).sum() == 1
    positive = code[(code > 0) & (code < 1)]
    for E in range(7):
        top = 10.0 ** -E
        decade = positive[(positive > top / 10) & (positive < top)]
        assert decade.numel() == 2 ** (6 - E), E
        steps = decade[1:] - decade[:-1]
        torch.testing.assert_close(steps, torch.full_like(steps, 0.9 * top / 2 ** (6 - E)), rtol=1e-4, atol=0)
    torch.testing.assert_close(code[code < 0].flip(0), -positive, rtol=0, atol=0)


# ---- quantise -> dequantise ------------------------------------------------------------------------------------
def test_nibbles_are_packed_high_first():
    idx = torch.tensor([1, 2, 3, 4, 15, 0], dtype=torch.uint8)
    assert pack_nibbles(idx).tolist() == [0x12, 0x34, 0xF0]
    assert torch.equal(unpack_nibbles(pack_nibbles(idx)), idx)


@given(out=st.integers(1, 40), inp=st.integers(1, 40), exponent=st.floats(-6, 4), outliers=st.booleans(),
       double_quant=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_error_is_within_the_blockwise_bound(out, inp, exponent, outliers, double_quant, seed):
    """Each weight comes back within (half the widest NF4 step) · (its block's absmax), from the nearest code;
    with double quantisation the absmax itself comes back within half the widest 8-bit step · its 256-block's
    absmax (of the centred absmaxes), and the weight within the NF4 bound plus that error."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 10 ** exponent
    if outliers:
        w.view(-1)[torch.randint(0, w.numel(), (3,), generator=g)] *= 50
    t = quantize_nf4(w, double_quant)
    got = dequantize_nf4(t, (out, inp)).double()
    assert got.shape == w.shape and got.dtype == torch.float64
    n_blocks = -(-w.numel() // 64)
    flat = torch.nn.functional.pad(w.view(-1).double(), (0, n_blocks * 64 - w.numel())).view(n_blocks, 64)
    c = flat.abs().amax(1)                                                    # the true absmaxes
    idx = unpack_nibbles(t["codes"]).view(n_blocks, 64).long()
    scaled = flat / c[:, None]
    dist = (scaled[..., None] - NF4_CODE.double()).abs()                      # (blocks, 64, 16)
    assert (dist.gather(2, idx[..., None])[..., 0] <= dist.amin(2) + 1e-6).all()  # the nearest code
    c_err = torch.zeros_like(c)
    if double_quant:
        centred = c - c.mean()
        c2 = torch.nn.functional.pad(centred, (0, -(-n_blocks // 256) * 256 - n_blocks)).view(-1, 256).abs().amax(1)
        c2 = c2.repeat_interleave(256)[:n_blocks]
        c_err = (dequantize_absmax(t).double() - c).abs()
        # fp32 rounds code·c2 + mean relative to c2 and the mean, not to the (possibly far smaller) block absmax;
        # -1 has no code (the map's ends are -0.993 and 1), so a centred absmax of -c2 is off by the half step
        assert (c_err <= HALF_GAP_8BIT * c2 + 1e-6 * (c + c2 + c.mean().abs())).all()
    bound = (HALF_GAP * c + c_err + 1e-6 * c).repeat_interleave(64)[:w.numel()].view(out, inp)
    assert ((got - w.double()).abs() <= bound).all()


def test_padding_and_bad_input():
    """in·out not a multiple of 64: the last block is padded with zeros (stored whole); the shape comes back."""
    w = torch.randn(3, 7)
    t = quantize_nf4(w, double_quant=False)
    assert t["codes"].shape == (32,) and t["absmax"].shape == (1,)
    assert (unpack_nibbles(t["codes"])[21:] == 7).all()                       # the code of 0
    assert dequantize_nf4(t, (3, 7)).shape == (3, 7)
    assert torch.equal(dequantize_nf4(quantize_nf4(torch.zeros(5, 64)), (5, 64)), torch.zeros(5, 64))
    with pytest.raises(TypeError, match="floating-point"):
        quantize_nf4(torch.ones(4, 16, dtype=torch.int64))
    for bad in (torch.tensor([[1.0, float("nan")]]), torch.tensor([[float("inf")]]), torch.zeros(0, 3)):
        with pytest.raises(ValueError, match="finite"):
            quantize_nf4(bad)
    with pytest.raises(ValueError, match="2-D"):
        NF4Linear(torch.randn(64))


# ---- bitsandbytes, byte for byte -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bnb():
    """bitsandbytes.functional; CPU tensors (its quantize_4bit runs on CPU since the multi-backend releases)."""
    return pytest.importorskip("bitsandbytes.functional")


def bnb_reference_blockwise(x, code, block):
    """bitsandbytes' own pure-PyTorch ('default') kernel for 8-bit blockwise quantisation: the exact nearest code.
    On CPU quantize_4bit calls its native kernel instead, which picks a neighbour of the nearest code for values
    close to a midpoint (seen for ~0.1% of the absmaxes, one or two codes away), so the double-quantised codes
    are compared with both."""
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    return op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd), x, code, block)


def test_code_books_equal_bitsandbytes(bnb):
    assert torch.equal(NF4_CODE, bnb.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(DYNAMIC_CODE, bnb.create_dynamic_map())


SHAPES = [(96, 32), (128, 32), (192, 64), (7, 9), (300, 200), (2304, 768), (768, 3072)]


@pytest.mark.parametrize("shape", SHAPES)
def test_storage_and_dequantised_weights_equal_bitsandbytes(bnb, shape):
    """quant_type="nf4", blocksize=64, compress_statistics False and True, on the same fp32 tensor:
    the packed bytes, the absmaxes, the double-quantised absmaxes and the dequantised weights.
    (The dequantised weights are compared on rows of whole blocks: bitsandbytes 0.50's native CPU
    dequantize_4bit gives wrong values for some shapes whose rows are not, e.g. 128 x 32.)"""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))) * 0.02
    n = w.numel()
    whole_rows = shape[1] % 64 == 0

    q, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    t = quantize_nf4(w, double_quant=False)
    assert torch.equal(q.view(-1), t["codes"][:(n + 1) // 2])               # bitsandbytes stores ceil(n/2) bytes
    assert torch.equal(state.absmax, t["absmax"])
    if whole_rows:
        assert torch.equal(bnb.dequantize_4bit(q, state), dequantize_nf4(t, shape))

    q, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    t = quantize_nf4(w, double_quant=True)
    assert torch.equal(q.view(-1), t["codes"][:(n + 1) // 2])
    assert torch.equal(state.offset, t["absmax_offset"]) and torch.equal(state.state2.absmax, t["absmax_scale"])
    absmax = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")[1].absmax
    reference, _ = bnb_reference_blockwise(absmax - state.offset, bnb.create_dynamic_map(), 256)
    assert torch.equal(reference, t["absmax_codes"])                        # the exact nearest 8-bit code
    native, ours = state.absmax.long(), t["absmax_codes"].long()
    live = state.state2.absmax.repeat_interleave(256)[:ours.numel()] > 0   # (a lone absmax centres to 0: any code)
    differ = (native != ours) & live
    step = (DYNAMIC_CODE[native] - DYNAMIC_CODE[ours]).abs()
    assert differ.float().mean() < 0.01 and (step[differ] <= 2 * HALF_GAP_8BIT).all()  # near misses, if ever
    if whole_rows:
        got = dequantize_nf4(t, shape)
        theirs = bnb.dequantize_4bit(q, state)
        assert (theirs - got).abs().max() <= 2 * HALF_GAP_8BIT * state.state2.absmax.max()  # one 8-bit step of c
        state.absmax = t["absmax_codes"].clone()                            # their dequantisation of our codes
        assert torch.equal(bnb.dequantize_4bit(q, state), got)


# ---- the layer and the model -----------------------------------------------------------------------------------
def plain_twin(folder, nf4_model):
    """The same GPT with each NF4 layer's dequantised W0' loaded into a plain nn.Linear."""
    model = GPT.from_pretrained(str(folder))
    with torch.no_grad():
        for name, layer in nf4_layers(nf4_model):
            name = name.removesuffix(".base")
            model.get_submodule(name).weight.copy_(layer.weight)
    return model


@pytest.mark.parametrize("use_dora", [False, True])
def test_nf4_base_with_zero_B_is_the_dequantised_model_exactly(folder, use_dora):
    model = GPT.from_pretrained(str(folder))
    assert quantize_base(model) == 8                                         # 4 projections x 2 blocks
    apply_lora(model, r=4, targets=["c_attn", "c_proj", "mlp.c_fc"], use_dora=use_dora, verbose=False)
    twin = plain_twin(folder, model)
    ids = batch()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, twin(ids).logits)
        assert not torch.equal(model(ids).logits, GPT.from_pretrained(str(folder))(ids).logits)  # W0' is not W0


def test_gradients_through_the_4bit_base_equal_the_plain_layers(folder):
    """Backward dequantises W0' again (nothing full-size is kept): A's and B's gradients as with W0' in nn.Linear."""
    model = GPT.from_pretrained(str(folder))
    quantize_base(model)
    apply_lora(model, r=4, targets=["c_attn", "mlp.c_proj"], verbose=False)
    twin = apply_lora(plain_twin(folder, model), r=4, targets=["c_attn", "mlp.c_proj"], verbose=False)
    with torch.no_grad():
        for p, q in zip(lora_parameters(model), lora_parameters(twin), strict=True):
            p.normal_(0, 0.1)
            q.copy_(p)
    ids = batch(3)
    loss = model(ids).logits.logsumexp(-1).mean()
    loss_twin = twin(ids).logits.logsumexp(-1).mean()
    torch.testing.assert_close(loss, loss_twin, rtol=0, atol=0)
    grads = torch.autograd.grad(loss, lora_parameters(model))
    grads_twin = torch.autograd.grad(loss_twin, lora_parameters(twin))
    for g, h in zip(grads, grads_twin, strict=True):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_on_a_4bit_base_trains_and_leaves_it_untouched(folder, tokenizer, use_dora):
    """As the LoRA training test: the loss of a small corpus falls, and the 4-bit storage is bit-identical after."""
    ids = tokenizer.encode("the quick brown fox jumps over the lazy dog. " * 40)
    vocab = sorted(set(ids))
    ids = [vocab.index(i) for i in ids]
    examples = [Example(ids[i:i + 16], [1] * 16) for i in range(0, len(ids) - 16, 16)]
    model = GPT.from_pretrained(str(folder))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(10)
    quantize_base(model)
    apply_lora(model, r=8, alpha=16, targets=["c_attn", "c_proj", "mlp.c_fc"], use_dora=use_dora, verbose=False)
    stored = {k: v.clone() for k, v in model.state_dict().items() if "absmax" in k or k.endswith("codes")}
    loss_fn = lm_loss_fn(model)
    with torch.no_grad():
        before = loss_fn(collate_lm(examples)).item()
    train(lora_parameters(model), loss_fn, examples,
          config=TrainConfig(epochs=20, max_steps=30, batch_size=8, lr=1e-2, progress=False))
    with torch.no_grad():
        after = loss_fn(collate_lm(examples)).item()
    assert after < 0.5 * before, (before, after)
    assert len(stored) == 8 * 4 and all(torch.equal(model.state_dict()[k], v) for k, v in stored.items())


def test_bf16_autocast_leaves_the_4bit_layers_alone(folder):
    """cast_frozen_linears casts plain frozen nn.Linears only: the NF4 layers (all the blocks' projections) keep
    their 4-bit storage, and under bf16 autocast the loss is the fp32 loss to bf16 precision."""
    model = GPT.from_pretrained(str(folder))
    quantize_base(model)
    apply_lora(model, r=4, targets=["c_attn"], verbose=False)
    stored = {k: v.clone() for k, v in model.state_dict().items() if "absmax" in k or k.endswith("codes")}
    assert cast_frozen_linears(model, torch.bfloat16) == 0                   # the tied head is skipped too
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stored.items())
    ids = batch(5)
    fp32 = model(ids).logits.float().logsumexp(-1).mean()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(ids).logits.float().logsumexp(-1).mean()
    bf16.backward()
    assert abs(bf16.item() - fp32.item()) < 0.02 * abs(fp32.item())
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora_parameters(model))


def test_merge_dequantises_and_single_layer_merge_is_refused(folder):
    model = GPT.from_pretrained(str(folder))
    quantize_base(model)
    apply_lora(model, r=4, targets=["c_attn", "attn.c_proj"], use_dora=True, verbose=False)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.2)
    layer = next(m for _, m in lora_modules(model))
    with pytest.raises(RuntimeError, match="merge_lora"):
        layer.merge()
    ids = batch(2)
    with torch.no_grad():
        want = model(ids).logits
        merged = merge_lora(model)
        assert not nf4_layers(merged) and not list(lora_modules(merged))
        # the model's own projection class, so the merged model keeps the bf16 CPU decoding path
        assert all(type(m) is Linear for n, m in merged.named_modules() if n.endswith(("c_attn", "c_proj", "c_fc")))
        assert (merged(ids).logits - want).abs().max() < 1e-5
        if packed_linear_available():
            merged.to(torch.bfloat16)
            layer = merged.transformer.h[0].attn.c_attn
            x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
            assert layer.takes_fast_path(x) and torch.equal(layer(x), layer.reference(x))


def test_quantize_base_refuses_a_model_with_lora(folder):
    model = apply_lora(GPT.from_pretrained(str(folder)), r=2, verbose=False)
    with pytest.raises(ValueError, match="quantize_base.*first"):
        quantize_base(model)
    model = GPT.from_pretrained(str(folder))
    quantize_base(model)
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_base(model)


# ---- memory ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("double_quant, bits", [(True, 4 + 8 / 64 + 32 / (64 * 256)), (False, 4 + 32 / 64)])
def test_gpt2_small_layers_take_at_most_a_sixth_of_fp32(double_quant, bits):
    """One GPT-2 124M block (n_embd 768): 4.127 bits a weight with double quantisation, 4.5 without (+ one fp32
    mean per layer); lora_summary prints the figure."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_positions=16, n_layer=1))
    n_params = sum(p.numel() for p in model.parameters())
    quantize_base(model, double_quant=double_quant)
    layers = nf4_layers(model)
    assert [(m.in_features, m.out_features) for _, m in layers] == [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
    for _, m in layers:
        n = m.in_features * m.out_features                                   # all whole blocks of 64 and of 64·256
        assert m.nbytes() == n * bits / 8 + 4 * double_quant                 # + the absmaxes' mean
        assert m.nbytes() <= 4 * n / 6
    apply_lora(model, r=8, verbose=False)
    assert f"base Linears 4-bit NF4: {sum(m.nbytes() for _, m in layers) / 2**20:.3g} MiB (fp32 would be 27 MiB, " \
           f"1/{32 / bits:.2f})" in lora_summary(model)
    assert f"24,576 trainable of {n_params + 24_576:,} parameters" in lora_summary(model)  # 4-bit ones counted


# ---- command line ----------------------------------------------------------------------------------------------
def run_cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_trains_on_nf4_and_merges_into_the_dequantised_base(tiny_hf, tmp_path, capsys):
    folder = tiny_hf[2]
    data = tmp_path / "text.txt"
    data.write_text("a short text to go over again and again. " * 6)
    out = tmp_path / "ad"
    common = ["--weights", str(folder), "--device", "cpu"]
    code, stdout, err = run_cli(["train", "--data", str(data), "--out", str(out), *common, "--block-size", "16",
                                 "--batch-size", "4", "--no-progress", "--max-steps", "3", "--quantize", "nf4",
                                 "--precision", "bf16", "--lr", "1e-2"], capsys)
    assert code == 0, err
    assert "base Linears 4-bit NF4:" in stdout and "saved LoRA adapter" in stdout
    code, _, err = run_cli(["merge", "--lora", str(out), "--out", str(tmp_path / "m"), *common, "--quantize", "nf4"],
                           capsys)
    assert code == 0, err
    model = GPT.from_pretrained(str(folder))
    quantize_base(model)
    load_adapter(model, out)
    assert any(m.B.abs().sum() > 0 for _, m in lora_modules(model))
    ids = torch.randint(0, 50257, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (GPT.from_pretrained(str(tmp_path / "m"))(ids).logits - model(ids).logits).abs().max() < 1e-5


def test_cli_quantize_options(tmp_path, capsys):
    parse = build_parser().parse_args
    base = ["train", "--data", "d.txt", "--out", "o"]
    assert run_info(parse(base))["quantize"] is None                        # what older checkpoints hold
    assert run_info(parse(base + ["--quantize", "nf4"]))["quantize"] == "nf4+double-quant"
    assert run_info(parse(base + ["--quantize", "nf4", "--no-double-quant"]))["quantize"] == "nf4"
    data = tmp_path / "d.txt"
    data.write_text("some text " * 20)
    code, _, err = run_cli(["train", "--data", str(data), "--out", str(tmp_path / "o"), "--model", "tiny",
                            "--device", "cpu", "--no-double-quant"], capsys)
    assert code == 2 and "error: --no-double-quant applies to --quantize nf4 only" in err
    code, _, err = run_cli(base + ["--quantize", "nf8"], capsys)
    assert code == 2 and "invalid choice" in err
    json.dumps(run_info(parse(base + ["--quantize", "nf4"])))                # JSON-ready, as checkpoints store it


def test_cli_resume_continues_a_4bit_run_exactly_and_refuses_another_setting(tiny_hf, tmp_path, capsys):
    """--quantize is part of the run: a checkpoint of an NF4 run resumes to the uninterrupted run's adapter, and
    resuming it without --quantize (or without double quantisation) is refused with the difference named."""
    from safetensors.torch import load_file
    data = tmp_path / "text.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 20)

    def run(out, *extra):
        return run_cli(["train", "--weights", str(tiny_hf[2]), "--data", str(data), "--block-size", "16",
                        "--batch-size", "3", "--device", "cpu", "--no-progress", "--precision", "fp32",
                        "--max-steps", "4", "--out", str(tmp_path / out), *extra], capsys)
    assert run("a", "--quantize", "nf4", "--save-every", "2")[0] == 0
    state = str(tmp_path / "a" / "train_state")
    code, out, err = run("b", "--quantize", "nf4", "--resume", state)
    assert code == 0 and "resuming from" in out, err
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    code, _, err = run("c", "--resume", state)
    assert code == 2 and "quantize: 'nf4+double-quant' in the checkpoint, None now" in err
    code, _, err = run("d", "--quantize", "nf4", "--no-double-quant", "--resume", state)
    assert code == 2 and "quantize: 'nf4+double-quant' in the checkpoint, 'nf4' now" in err
