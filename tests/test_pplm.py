"""PPLM: properties of the algorithm, the attribute models, and steering that works on a small model.

Two small random models are built here (no transformers needed):
- `small`: n_embd 32, 2 layers, its matrices scaled by 5 so that the next-token
  distribution depends visibly on the past (at GPT-2's init scale it is near uniform).
- `tiny64`: the same shape in float64 for gradient checks.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minigpt
from minigpt import GPT, GPTConfig, get_tokenizer
from techniques import pplm
from techniques.pplm import SMALL_CONST, Objective, PPLMConfig, clean_word_lines, load_labelled_tsv
from techniques.pplm.__main__ import main as pplm_main

ROOT = Path(__file__).resolve().parents[1]
CFG = dict(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4, embd_pdrop=0.0, attn_pdrop=0.0,
           resid_pdrop=0.0)


def make_model(scale=5.0, seed=0, dtype=torch.float32, **over):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(**{**CFG, **over}))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(scale)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    return m.to(dtype).eval()


@pytest.fixture(scope="module")
def small():
    return make_model()


@pytest.fixture(scope="module")
def tiny64():
    return make_model(scale=3.0, seed=1, dtype=torch.float64)


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def padded(rows):
    """Left-pad lists of ids: (ids, mask) or (ids, None) when all rows have the same length."""
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), minigpt.EOT_ID)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r), 1
    return ids, (None if bool(mask.all()) else mask)


prompts = st.lists(st.lists(st.integers(0, 50256), min_size=1, max_size=6), min_size=1, max_size=3)


# ---- stepsize 0 is plain decoding ------------------------------------------------------------------
@settings(max_examples=12)
@given(rows=prompts, gm=st.floats(0, 1), which=st.sampled_from(["stepsize", "num_iterations"]),
       do_sample=st.booleans(), temperature=st.sampled_from([0.0, 0.7, 1.0, 1.8]),
       top_k=st.sampled_from([0, 1, 5, 100]), seed=st.integers(0, 2**31 - 1), new=st.integers(1, 4))
def test_no_step_equals_plain_generate(small, rows, gm, which, do_sample, temperature, top_k, seed, new):
    """What is compared: the token ids, bit for bit, of pplm.generate with stepsize 0 (or
    num_iterations 0) and of minigpt.generate with the same prompt, mask, temperature, top_k
    (0 = None), do_sample and a generator with the same seed. The fusion is
    logits + gm·(log p̃ - log p), which is the logits unchanged when p̃ is p, so any gm_scale gives
    the same draw from the same generator."""
    ids, mask = padded(rows)
    knobs = {which: 0}
    out = pplm.generate(small, ids, attention_mask=mask, bow="space", max_new_tokens=new, gm_scale=gm,
                        do_sample=do_sample, temperature=temperature, top_k=top_k,
                        generator=torch.Generator().manual_seed(seed), **knobs)
    ref = minigpt.generate(small, ids, attention_mask=mask, max_new_tokens=new, do_sample=do_sample,
                           temperature=temperature, top_k=top_k or None, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(out.sequences, ref)
    assert not any(s.perturbed for s in out.steps)


@settings(max_examples=6)
@given(rows=prompts, do_sample=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_gm_scale_zero_ignores_a_real_perturbation(small, rows, do_sample, seed):
    """gm_scale 0 drops p̃ from the fusion: the past IS perturbed (losses recorded, p̃ differs
    from p) and yet the tokens are minigpt.generate's, because the unperturbed cache is kept apart."""
    ids, mask = padded([[minigpt.EOT_ID] + r for r in rows])
    out = pplm.generate(small, ids, attention_mask=mask, bow="military", max_new_tokens=4, gm_scale=0.0,
                        stepsize=0.3, do_sample=do_sample, generator=torch.Generator().manual_seed(seed))
    ref = minigpt.generate(small, ids, attention_mask=mask, max_new_tokens=4, do_sample=do_sample, top_k=10,
                           generator=torch.Generator().manual_seed(seed))
    assert torch.equal(out.sequences, ref)
    assert all(s.perturbed and s.loss.shape == (3, len(rows)) for s in out.steps)
    assert not torch.allclose(out.stacked("attribute_before"), out.stacked("attribute_after"))


# ---- the gradient -----------------------------------------------------------------------------------
def _objective(kind, model, bags_ids=(11, 250, 3000, 40000)):
    if kind == "bow":
        M = torch.zeros(2, model.config.vocab_size, dtype=torch.float64)
        M[0, list(bags_ids[:2])], M[1, list(bags_ids[2:])] = 1, 1
        return Objective(bags=M, kl_scale=0.5)
    torch.manual_seed(3)
    head = pplm.Discriminator(model.config.n_embd, ["x", "y", "z"]).double()
    # detach_current=False: the full derivative (by default the current token's hidden state is held
    # constant, as in the reference, so autograd would rightly disagree with finite differences)
    return Objective(head=head, label=2, kl_scale=0.5, horizon_length=2, detach_current=False)


@pytest.mark.parametrize("kind", ["bow", "discriminator"])
def test_gradient_matches_finite_differences(tiny64, kind):
    """d loss/dΔ from autograd against a central difference along random directions (float64),
    at a nonzero Δ so the KL term contributes; rows of different lengths (left padding)."""
    ids, mask = padded([[5, 17, 900, 4, 33], [42, 7, 2]])
    ctx = pplm.prompt_context(tiny64, ids, mask)
    obj = _objective(kind, tiny64)
    g0 = torch.Generator().manual_seed(0)
    d0 = 0.05 * torch.randn(ctx.past.shape, generator=g0, dtype=torch.float64)
    f = lambda d: pplm.perturbed_loss(tiny64, ctx, d, obj)[0].sum()
    d = d0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(d), d)
    assert g[:, :, 1, :, :2].abs().max() == 0  # row 1's two padded positions carry no gradient
    eps = 1e-6
    with torch.no_grad():
        for _ in range(3):
            v = torch.randn(ctx.past.shape, generator=g0, dtype=torch.float64)
            fd = (f(d0 + eps * v) - f(d0 - eps * v)) / (2 * eps)
            assert abs(fd - (g * v).sum()) <= 1e-6 * max(1.0, abs(fd))


# ---- the equations, written out (float64) ------------------------------------------------------------
def _written_out_norm(g, l, b):
    """‖g‖ of layer l, row b: keys and values together, summed element by element."""
    keys, values = g[l, 0, b].flatten().tolist(), g[l, 1, b].flatten().tolist()
    return math.sqrt(math.fsum(x * x for x in keys + values))


@settings(max_examples=8)
@given(kind=st.sampled_from(["bow", "discriminator"]), stepsize=st.floats(1e-3, 0.5), gamma=st.floats(0, 2),
       iterations=st.integers(1, 3))
def test_update_rule_is_the_equation(tiny64, kind, stepsize, gamma, iterations):
    """Δ ← Δ − stepsize · g / s^γ per layer l and row b, written out one layer and row at a time:
    g = ∂L/∂Δ at the current Δ (times the window: here each row's real positions), n_lb = ‖g_lb‖ over
    the layer's keys AND values, and s_lb = n_lb + SMALL_CONST, except for BoW alone, where s_lb is the
    running max of the norms over the whole generation, max(n¹ + SMALL_CONST, n², n³, ...). perturb_past
    is called twice (two tokens) with BoW's running max carried from the first call into the second.
    Row 2 is a one-token prompt beside longer ones: its past is all padding, so its gradient is 0 and
    SMALL_CONST is what keeps its Δ at 0 rather than 0/0."""
    ids, mask = padded([[5, 17, 900, 4, 33], [42, 7, 2], [8]])
    ctx = pplm.prompt_context(tiny64, ids, mask)
    obj = _objective(kind, tiny64)
    cfg = PPLMConfig(stepsize=stepsize, gamma=gamma, num_iterations=iterations)
    L, B, T_past = ctx.past.size(0), ctx.past.size(2), ctx.past.size(4)
    real = mask[:, :T_past].to(torch.float64)                       # the window of the default window_length 0
    history = [[[] for _ in range(B)] for _ in range(L)]            # every norm seen, per layer and row
    grad_max = None
    for token in range(2):
        want = torch.zeros_like(ctx.past)
        for _ in range(iterations):
            d = want.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(pplm.perturbed_loss(tiny64, ctx, d, obj)[0].sum(), d)
            g = g * real[None, None, :, None, :, None]
            new = want.clone()
            for l in range(L):
                for b in range(B):
                    n = _written_out_norm(g, l, b)
                    history[l][b].append(n)
                    if kind == "bow":
                        s = max([history[l][b][0] + SMALL_CONST] + history[l][b][1:])
                    else:
                        s = n + SMALL_CONST
                    new[l, :, b] = want[l, :, b] - stepsize * g[l, :, b] / s ** gamma
            want = new
        delta, grad_max, losses, kls, norms = pplm.perturb_past(tiny64, ctx, obj, cfg, grad_max)
        torch.testing.assert_close(delta, want, rtol=1e-9, atol=1e-12)
        assert torch.equal(delta[:, :, 2], torch.zeros_like(delta[:, :, 2]))   # nothing real to move in row 2
        last = torch.tensor([[history[l][b][-iterations:] for b in range(B)] for l in range(L)], dtype=torch.float64)
        torch.testing.assert_close(torch.stack(norms), last.permute(2, 1, 0))   # (iters, B, L)
        assert len(losses) == len(kls) == iterations
        if kind == "bow":
            running = torch.tensor([[max([history[l][b][0] + SMALL_CONST] + history[l][b][1:]) for b in range(B)]
                                    for l in range(L)], dtype=torch.float64)
            torch.testing.assert_close(grad_max, running)
        else:
            assert grad_max is None


@given(data=st.data(), B=st.integers(1, 3), V=st.integers(2, 12))
def test_kl_term_is_the_equation(data, B, V):
    """KL(p̃ ‖ p) = Σ_i q_i · log(q_i / p'_i), written out element by element, with the reference's guard:
    an entry ≤ SMALL_CONST (of p̃ or of p) gets SMALL_CONST added, so zeros give no log(0) or division by 0.
    Rows mix exact tiny entries (0, SMALL_CONST itself, just above and below it) with ordinary ones
    scaled so that the row sums to 1."""
    tiny = st.sampled_from([0.0, 1e-300, 1e-20, SMALL_CONST, 2 * SMALL_CONST])
    entry = st.one_of(tiny.map(lambda x: ("exact", x)), st.floats(1e-6, 10.0).map(lambda x: ("free", x)))

    def row():
        e = data.draw(st.lists(entry, min_size=V, max_size=V).filter(lambda e: any(k == "free" for k, _ in e)))
        rest = 1 - math.fsum(x for k, x in e if k == "exact")
        free = math.fsum(x for k, x in e if k == "free")
        return [x if k == "exact" else x * rest / free for k, x in e]
    p_tilde, p = [row() for _ in range(B)], [row() for _ in range(B)]
    guard = lambda x: x + SMALL_CONST if x <= SMALL_CONST else x
    want = [math.fsum(guard(q) * math.log(guard(q) / guard(r)) for q, r in zip(qs, rs)) for qs, rs in zip(p_tilde, p)]
    got = pplm.kl_divergence(torch.tensor(p_tilde, dtype=torch.float64), torch.tensor(p, dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    assert torch.isfinite(got).all()


@given(data=st.data(), B=st.integers(1, 3), V=st.integers(2, 12), gm=st.floats(0, 1))
def test_fusion_is_the_equation(data, B, V, gm):
    """p_out ∝ p̃^gm · p^(1−gm), written out with p = softmax(logits) and p̃ = softmax(logits_pert) and
    normalised by hand, equals softmax of what step 4 hands to the sampler (fuse works in log space)."""
    draw = lambda: data.draw(st.lists(st.lists(st.floats(-20, 20), min_size=V, max_size=V), min_size=B, max_size=B))
    logits, logits_pert = draw(), draw()

    def softmax(z):
        e = [math.exp(x - max(z)) for x in z]
        return [x / math.fsum(e) for x in e]
    want = []
    for z, zt in zip(logits, logits_pert):
        u = [pt ** gm * p ** (1 - gm) for pt, p in zip(softmax(zt), softmax(z))]
        want.append([x / math.fsum(u) for x in u])
    fused = pplm.fuse(torch.tensor(logits, dtype=torch.float64), torch.tensor(logits_pert, dtype=torch.float64), gm)
    torch.testing.assert_close(fused.softmax(-1), torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-12)


@given(B=st.integers(1, 3), V=st.integers(3, 40), data=st.data())
def test_bow_loss_is_minus_log_of_summed_probs(B, V, data):
    logits = torch.tensor(data.draw(st.lists(st.lists(st.floats(-8, 8), min_size=V, max_size=V),
                                             min_size=B, max_size=B)), dtype=torch.float64)
    bags = data.draw(st.lists(st.sets(st.integers(0, V - 1), min_size=1), min_size=1, max_size=3))
    M = torch.zeros(len(bags), V, dtype=torch.float64)
    for i, b in enumerate(bags):
        M[i, list(b)] = 1
    p = logits.softmax(-1)
    want = torch.tensor([sum(-torch.log(sum(p[r, w] for w in b)) for b in bags) for r in range(B)])
    torch.testing.assert_close(pplm.bow_loss(p, M), want.to(torch.float64))


def test_bow_loss_in_the_model_is_minus_log_bag_mass(tiny64, tok):
    """At Δ = 0 the attribute loss is -log Σ_{w in bag} p(w) with p from an ordinary forward pass."""
    bag = pplm.load_bag("space", tok)
    ids = torch.tensor([[50256, 464, 13546]])
    ctx = pplm.prompt_context(tiny64, ids)
    M = torch.zeros(1, 50257, dtype=torch.float64)
    M[0, bag.token_ids] = 1
    with torch.no_grad():
        _, attr, kl, _, _ = pplm.perturbed_loss(tiny64, ctx, torch.zeros_like(ctx.past), Objective(bags=M))
        p = tiny64(ids).logits[0, -1].softmax(-1)
    torch.testing.assert_close(attr, -p[bag.token_ids].sum().log()[None].detach())
    assert abs(kl.item()) < 1e-10  # p̃ = p


@settings(max_examples=12)
@given(T=st.integers(3, 9), w=st.integers(1, 6), where=st.sampled_from(["oldest", "recent"]), decay=st.booleans())
def test_window_mask_zeroes_gradients_outside_the_window(tiny64, T, w, where, decay):
    ids = torch.arange(100, 100 + T)[None]
    ctx = pplm.prompt_context(tiny64, ids)
    T_past = T - 1
    cfg = PPLMConfig(window_length=w, window_from=where, decay=decay, num_iterations=2)
    delta = pplm.perturb_past(tiny64, ctx, _objective("bow", tiny64), cfg)[0]  # (L, 2, B, nh, T_past, hs)
    moved = delta.abs().amax(dim=(0, 1, 2, 3, 5)) > 0                          # (T_past,)
    if T_past <= w:
        inside = set(range(T_past))
    else:
        inside = set(range(w)) if where == "oldest" else set(range(T_past - w, T_past))
    assert {i for i in range(T_past) if moved[i]} == inside


def test_window_weights_count_real_positions_and_decay():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    old = pplm.window_weights(mask, 2, decay=True, window_from="oldest")
    assert old.tolist() == [[0, 0, 0.5, 1, 0, 0], [0.5, 1, 0, 0, 0, 0]]
    new = pplm.window_weights(mask, 3, window_from="recent")
    assert new.tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1]]
    assert pplm.window_weights(mask, 0).tolist() == mask.double().tolist()
    assert pplm.window_weights(mask, 4, decay=True).tolist()[0] == [0, 0, 1, 1, 1, 1]  # short row: whole, no decay


def test_kl_scale_zero_removes_the_kl_term(tiny64):
    ctx = pplm.prompt_context(tiny64, torch.tensor([[3, 99, 1234, 8]]))
    d = (0.05 * torch.randn(ctx.past.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    grads = {}
    for k in (0.0, 1.0):
        obj = _objective("bow", tiny64)
        obj.kl_scale = k
        dd = d.clone().requires_grad_(True)
        total, attr, kl, _, _ = pplm.perturbed_loss(tiny64, ctx, dd, obj)
        grads[k] = torch.autograd.grad(total.sum(), dd)[0]
        if k == 0:
            assert torch.equal(total, attr) and kl.item() > 0
            ga = grads[0]
        else:
            dd2 = d.clone().requires_grad_(True)
            gk = torch.autograd.grad(pplm.perturbed_loss(tiny64, ctx, dd2, obj)[2].sum(), dd2)[0]
            torch.testing.assert_close(grads[1], ga + gk)
    assert not torch.allclose(grads[0], grads[1])


def test_seed_makes_a_run_deterministic(small):
    ids = torch.tensor([[50256, 464, 13546]] * 3)
    run = lambda seed: pplm.generate(small, ids, bow="space", max_new_tokens=5, do_sample=True,
                                     generator=torch.Generator().manual_seed(seed))
    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a.sequences, b.sequences)
    for sa, sb in zip(a.steps, b.steps):
        assert torch.equal(sa.loss, sb.loss) and torch.equal(sa.grad_norm, sb.grad_norm)
    assert not torch.equal(a.sequences, c.sequences)


def test_batch_equals_one_at_a_time(tiny64):
    """Every per-sample quantity is per row: a padded batch gives each row what it gets alone."""
    rows = [[50256, 464, 13546, 318], [50256, 40]]
    ids, mask = padded(rows)
    kw = dict(bow="science", max_new_tokens=4, stepsize=0.05, window_length=2, window_from="recent")
    both = pplm.generate(tiny64, ids, attention_mask=mask, **kw)
    for r, row in enumerate(rows):
        one = pplm.generate(tiny64, torch.tensor([row]), **kw)
        assert one.sequences[0, len(row):].tolist() == both.sequences[r, ids.size(1):].tolist()
        torch.testing.assert_close(one.stacked("loss")[:, :, 0], both.stacked("loss")[:, :, r])
        torch.testing.assert_close(one.stacked("grad_norm")[:, :, 0], both.stacked("grad_norm")[:, :, r])


# ---- steering works (fixed seeds, small model) -------------------------------------------------------
def test_bow_raises_the_share_of_bag_tokens(small, tok):
    bag = pplm.load_bag("military", tok)
    ids = torch.tensor([[50256] + tok.encode("The lake")] * 4)
    share = {}
    for ss in (0.0, 0.3):
        out = pplm.generate(small, ids, bow=bag, max_new_tokens=10, stepsize=ss, num_iterations=5, do_sample=True,
                            generator=torch.Generator().manual_seed(0))
        new = out.sequences[:, ids.size(1):].flatten().tolist()
        share[ss] = sum(t in set(bag.token_ids) for t in new) / len(new)
        if ss:
            assert (out.stacked("attribute_after") > out.stacked("attribute_before")).float().mean() > 0.9
    assert share[0.3] >= share[0.0] + 0.15, share


def test_discriminator_steering_raises_the_target_class(small):
    torch.manual_seed(1)
    head = pplm.Discriminator(32, ["a", "b"])
    with torch.no_grad():
        head.mlp.weight.mul_(3)  # a confident head: p(b) starts near 0.1
    ids = torch.tensor([[50256, 464, 13546]] * 3)
    score = {}
    for ss in (0.0, 0.1):
        out = pplm.generate(small, ids, discriminator=head, class_label="b", max_new_tokens=8, stepsize=ss,
                            do_sample=True, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            score[ss] = head(pplm.mean_hidden(small, out.sequences)).softmax(-1)[:, 1]
    assert (score[0.1] > score[0.0]).all() and score[0.1].mean() > score[0.0].mean() + 0.2, score


# ---- attribute models ---------------------------------------------------------------------------------
def test_paper_head_fits_gpt2_medium_and_is_refused_by_gpt2():
    head = pplm.load_discriminator("sentiment")
    assert head.n_embd == 1024 and head.class_index("very positive") == 2 and head.class_index("very_negative") == 3
    with torch.device("meta"):
        medium, small = GPT(GPTConfig.from_name("gpt2-medium")), GPT(GPTConfig.from_name("gpt2"))
    head.check_model(medium)
    with pytest.raises(ValueError, match="n_embd=1024.*n_embd=768"):
        head.check_model(small)
    with pytest.raises(ValueError, match="n_embd=1024"):
        pplm.generate(small, torch.tensor([[1, 2]]), discriminator=head, class_label=2)
    with pytest.raises(ValueError, match="not one of this head's classes"):
        head.class_index("ecstatic")


def test_paper_head_steers_a_1024_wide_model():
    m = make_model(scale=2.0, vocab_size=300, n_embd=1024, n_layer=1, n_head=16, n_positions=16)
    head = pplm.load_discriminator("clickbait")
    out = pplm.generate(m, torch.tensor([[1, 2, 3]]), discriminator=head, class_label="clickbait",
                        max_new_tokens=2, stepsize=0.05)
    assert torch.isfinite(out.stacked("loss")).all() and out.stacked("hidden_after").shape == (2, 1, 1024)


def test_discriminator_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    head = pplm.Discriminator(32, ["neg", "pos"], "tiny")
    head.save(tmp_path / "h")
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["discriminator.json", "discriminator.safetensors"]
    back = pplm.load_discriminator(tmp_path / "h")
    x = torch.randn(4, 32)
    assert torch.equal(head(x), back(x)) and back.class_names == ["neg", "pos"]
    with pytest.raises(ValueError, match="unknown discriminator"):
        pplm.load_discriminator(tmp_path / "nothing")


def test_train_discriminator_on_cached_features(small):
    good, bad = ["wonderful", "great", "superb", "lovely"], ["awful", "boring", "terrible", "ugly"]
    g = torch.Generator().manual_seed(0)
    pick = lambda ws: " ".join(ws[i] for i in torch.randint(0, 4, (4,), generator=g).tolist())
    texts = [pick(good) if i % 2 else pick(bad) for i in range(96)]
    labels = [i % 2 for i in range(96)]
    cfg = minigpt.TrainConfig(epochs=30, batch_size=32, lr=3e-2, progress=False)
    head, report = pplm.train_discriminator(small, texts[:64], labels[:64], ["neg", "pos"], eval_texts=texts[64:],
                                            eval_labels=labels[64:], config=cfg, progress=False)
    assert report["dev_accuracy"] >= 0.9, report["dev_accuracy"]
    assert report["history"][-1]["loss"] < report["history"][0]["loss"]
    assert all(not p.requires_grad or p.grad is None for p in small.parameters())  # the base stayed frozen


def test_sst2_tsv_loads(tmp_path):
    texts, ys, names = load_labelled_tsv(ROOT / "data" / "sst2" / "dev.tsv", ["negative", "positive"])
    assert len(texts) == 872 and set(ys) == {0, 1} and names == ["negative", "positive"]
    bad = tmp_path / "bad.tsv"
    bad.write_text("label\ttext\npos\tfine\nno tab here\n")
    with pytest.raises(ValueError, match="line 3: expected"):
        load_labelled_tsv(bad)
    bad.write_text("pos\tfine\nmeh\tso so\n")
    with pytest.raises(ValueError, match="line 2: label 'meh'"):
        load_labelled_tsv(bad, ["neg", "pos"])


# ---- bags of words -----------------------------------------------------------------------------------
def test_word_lists_survive_their_quirks(tok):
    comp = pplm.load_bag("computers", tok)
    assert "algorithm" in comp.words and not any("[" in w for w in comp.words)
    kitchen = pplm.load_bag("kitchen", tok)
    assert "aluminum foil" in kitchen.multi and kitchen.words[-1] == open(
        ROOT / "techniques/data/pplm/wordlists/kitchen.txt").read().split("\n")[-1].strip()
    assert len(kitchen.single) + len(kitchen.multi) == len(kitchen.words)
    legal = pplm.load_bag("legal", tok)
    assert legal.duplicates > 0 and len(set(legal.words)) == len(legal.words)
    first = pplm.load_bag("kitchen", tok, multi_token="first")
    assert set(kitchen.token_ids) < set(first.token_ids)
    assert tok.encode(" aluminum")[0] in first.token_ids
    assert "single-token" in kitchen.summary() and f"{len(kitchen.single)} single-token" in kitchen.summary()
    assert clean_word_lines(["\ufeffa  [1/2]", "", "# note", "b\r", "a"]) == (["a", "b"], 1)


def test_bag_errors(tmp_path, tok):
    with pytest.raises(ValueError, match="unknown bag of words 'nosuch'.*space"):
        pplm.load_bag("nosuch", tok)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n# only a comment\n")
    with pytest.raises(ValueError, match="is empty"):
        pplm.load_bag(empty, tok)
    with pytest.raises(ValueError, match="none of its 1 words is a single GPT-2 token"):
        pplm.load_bag(["antidisestablishmentarianism"], tok)
    assert pplm.load_bag(["antidisestablishmentarianism"], tok, multi_token="first").token_ids


def test_knob_and_input_errors(small):
    ids = torch.tensor([[1, 2]])
    for knob, value in [("gm_scale", 1.5), ("stepsize", -1), ("horizon_length", 0), ("top_k", -1),
                        ("window_from", "middle"), ("repetition_penalty", 0), ("kl_scale", float("nan")),
                        ("num_iterations", 2.5)]:
        with pytest.raises(ValueError, match=knob):
            pplm.generate(small, ids, bow="space", **{knob: value})
    with pytest.raises(ValueError, match="needs an attribute model"):
        pplm.generate(small, ids)
    with pytest.raises(ValueError, match="needs class_label"):
        pplm.generate(small, ids, discriminator=pplm.Discriminator(32, ["a", "b"]))
    with pytest.raises(TypeError):
        pplm.generate(small, ids, bow="space", step_size=0.1)


def test_repetition_penalty_discourages_repeats(small):
    ids = torch.tensor([[50256, 464, 13546]])
    plain = pplm.generate(small, ids, bow="space", max_new_tokens=12, stepsize=0)
    pen = pplm.generate(small, ids, bow="space", max_new_tokens=12, stepsize=0, repetition_penalty=50.0)
    rep = lambda s: len(s) - len(set(s))
    assert rep(pen.sequences[0].tolist()) <= rep(plain.sequences[0].tolist())
    assert rep(pen.sequences[0, 3:].tolist()) == 0


# ---- command line ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_small(small, tmp_path_factory):
    d = tmp_path_factory.mktemp("pplm-small")
    small.save_pretrained(str(d))
    return d


def test_cli_side_by_side(saved_small, capsys):
    rc = pplm_main(["--weights", str(saved_small), "--device", "cpu", "--bow", "space;military", "--prompt",
                    "The lake", "--length", "4", "--num-samples", "2", "--sample", "--stepsize", "0.3"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.count("== sample") == 2 and "unperturbed" in out and "perturbed (PPLM)" in out
    assert "bag 'space': 18 words, 18 single-token" in err


def run_cli(capsys, *argv):
    """python -m techniques.pplm in-process: (exit code, stdout, stderr)."""
    code = pplm_main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, *words):
    """The error policy: exit 2, one `error:` line on stderr, no traceback, the message's key words."""
    assert code == 2, err
    assert err.startswith("error:") and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


def test_cli_errors(saved_small, capsys):
    for args, msg in [(["--bow", "nosuch"], "unknown bag of words"), ([], "give a bag of words"),
                      (["--discrim", "sentiment", "--class-label", "very_positive"], "n_embd=1024"),
                      (["--bow", "space", "--gm-scale", "2"], "gm_scale must be in")]:
        code, _, err = run_cli(capsys, "--weights", str(saved_small), "--device", "cpu", *args)
        assert_one_line_error(code, err, msg)


def test_cli_prompt_longer_than_the_context_is_one_line(saved_small, tok, tmp_path, capsys):
    """A prompt that leaves no room for a new token in n_positions = 64: one line that says by
    how many tokens it is over (the command puts <|endoftext|> in front, as the reference does)."""
    prompt = "the lake " * 40
    n = 1 + len(tok.encode(prompt))
    over = n - (CFG["n_positions"] - 1)                 # the prompt and one new token must fit
    assert over > 0
    code, out, err = run_cli(capsys, "--weights", str(saved_small), "--device", "cpu", "--bow", "space",
                             "--prompt", prompt, "--length", "5")
    assert_one_line_error(code, err, "the prompt is too long", f"{n} tokens", f"{over} token(s) over the limit")
    assert out == ""                                    # refused before anything is printed
    # with a discriminator, its horizon needs room too
    pplm.Discriminator(CFG["n_embd"], ["a", "b"]).save(tmp_path / "head")
    code, _, err = run_cli(capsys, "--weights", str(saved_small), "--device", "cpu", "--discrim",
                           str(tmp_path / "head"), "--class-label", "b", "--horizon-length", "3", "--prompt", prompt)
    assert_one_line_error(code, err, f"{over + 3} token(s) over the limit", "3 horizon")
    # a prompt that fits with too long a --length: the largest --length that fits is named (64 - 3)
    code, _, err = run_cli(capsys, "--weights", str(saved_small), "--device", "cpu", "--bow", "space",
                           "--prompt", "the lake", "--length", "100")
    assert_one_line_error(code, err, "lower --length to at most 61")


def test_module_command_fails_in_one_line(saved_small):
    """`python -m techniques.pplm` as a user runs it: the package's __main__, no runpy warning, and a
    prompt over the context is one `error:` line with exit code 2."""
    r = subprocess.run([sys.executable, "-m", "techniques.pplm", "--weights", str(saved_small), "--device", "cpu",
                        "--bow", "space", "--prompt", "the lake " * 40], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert_one_line_error(r.returncode, r.stderr, "the prompt is too long", "token(s) over the limit")
    assert r.stdout == ""


def test_library_refuses_a_prompt_longer_than_the_context(small):
    ids = torch.ones(1, 70, dtype=torch.long)
    with pytest.raises(ValueError, match=r"the prompt is too long: 70 prompt tokens \+ 1 new = 71 > n_positions 64; "
                                         r"it is 7 token\(s\) over the limit"):
        pplm.generate(small, ids, bow="space", max_new_tokens=3)
    with pytest.raises(ValueError, match="lower max_new_tokens to at most 4"):
        pplm.generate(small, ids[:, :60], bow="space", max_new_tokens=5)


def test_cli_train_discriminator(saved_small, tmp_path, capsys):
    """The plan line (the real step count) and the head's size come first; then it trains that many steps."""
    data = tmp_path / "d.tsv"
    data.write_text("label\ttext\n" + "".join(f"{i % 2}\t{'great fun' if i % 2 else 'dull mess'} {i}\n"
                                              for i in range(40)))
    code, out, err = run_cli(capsys, "train-discriminator", "--weights", str(saved_small), "--device", "cpu",
                             "--data", str(data), "--class-names", "neg,pos", "--out", str(tmp_path / "head"),
                             "--epochs", "20", "--lr", "0.03", "--batch-size", "8", "--no-progress",
                             "--precision", "fp32")
    assert code == 0, err
    lines = out.splitlines()
    # 40 rows, --eval-fraction 0.1 held out: 36 train in 5 batches of 8, 20 epochs
    assert lines[0] == ("training 100 steps (20 epochs of 5 steps, batch 8) on 36 examples; "
                        "eval loss on 4 held-out examples; fp32")
    assert lines[1].startswith("discriminator head: 66 trainable parameters (2 classes")   # (32 + 1) · 2
    assert "dev accuracy" in lines[-1] and "on 4 rows" in lines[-1]
    head = pplm.load_discriminator(tmp_path / "head")
    assert head.class_names == ["neg", "pos"] and (tmp_path / "head" / "history.json").is_file()
    history = minigpt.read_json(tmp_path / "head" / "history.json")["history"]
    assert len(history) == 100 and history[-1]["loss"] < history[0]["loss"]
    # --max-steps is exactly that many steps; --eval-fraction 0 without --dev trains on every row
    code, out, err = run_cli(capsys, "train-discriminator", "--weights", str(saved_small), "--device", "cpu",
                             "--data", str(data), "--out", str(tmp_path / "head2"), "--max-steps", "7",
                             "--eval-fraction", "0", "--no-progress")
    assert code == 0, err
    assert out.startswith("training 7 steps (") and "on 40 examples; no eval split" in out and "no dev rows" in out
    assert len(minigpt.read_json(tmp_path / "head2" / "history.json")["history"]) == 7


def test_cli_train_discriminator_refuses_class_names_without_rows(saved_small, tmp_path, capsys):
    """--class-names a,b,c on data labelled 0/1 would train a class no row shows: refused, nothing saved."""
    data = tmp_path / "d.tsv"
    data.write_text("".join(f"{i % 2}\ttext {i}\n" for i in range(20)))
    code, _, err = run_cli(capsys, "train-discriminator", "--weights", str(saved_small), "--device", "cpu",
                           "--data", str(data), "--class-names", "a,b,c", "--out", str(tmp_path / "head"))
    assert_one_line_error(code, err, f"class 'c' (2) has no rows in the 18 training rows of {data}",
                          "every named class needs training rows", "nothing was saved")
    assert not (tmp_path / "head").exists()
    with pytest.raises(ValueError, match=r"classes 'b' \(1\), 'c' \(2\) have no rows in the training data"):
        pplm.check_classes_have_rows([0, 0, 0], ["a", "b", "c"])
    with pytest.raises(ValueError, match="every named class needs training rows"):
        pplm.train_discriminator(GPT(GPTConfig(**CFG)), ["x", "y"], [0, 1], ["a", "b", "c"], progress=False)


def test_progress_bar_ends_at_n_of_n(small, capsys):
    """The bar counts every generated token: it ends at 5/5, not 4/5."""
    pplm.generate(small, torch.tensor([[50256, 464, 13546]]), bow="space", max_new_tokens=5, progress=True)
    final = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("pplm: 100%") and "5/5" in final, final


def test_num_samples_reads_the_prompt_once(tiny64):
    """num_samples=k continues each prompt k times from one prompt pass: the same as repeating the rows."""
    ids = torch.tensor([[50256, 464, 13546], [50256, 40, 257]])
    kw = dict(bow="science", max_new_tokens=3, stepsize=0.05, do_sample=True)
    a = pplm.generate(tiny64, ids, num_samples=3, generator=torch.Generator().manual_seed(5), **kw)
    b = pplm.generate(tiny64, ids.repeat_interleave(3, 0), generator=torch.Generator().manual_seed(5), **kw)
    assert a.sequences.shape == (6, 6) and torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.stacked("loss"), b.stacked("loss"))


def test_eos_stops_rows_like_plain_generate(small):
    ids = torch.tensor([[50256, 464, 13546], [50256, 40, 257]])
    free = minigpt.generate(small, ids, max_new_tokens=6)
    eos = int(free[0, 5])  # row 0's third new token
    ref = minigpt.generate(small, ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    out = pplm.generate(small, ids, bow="space", max_new_tokens=6, eos_token_id=eos, pad_token_id=0, stepsize=0)
    assert torch.equal(out.sequences, ref)


def test_cli_help(capsys):
    for argv in (["--help"], ["train-discriminator", "--help"]):
        with pytest.raises(SystemExit) as e:
            pplm_main(argv)
        assert e.value.code == 0 and "--device" in capsys.readouterr().out


# ---- an initial past (a prefix) in front of the prompt ------------------------------------------------
@settings(max_examples=6)
@given(rows=prompts, head=st.lists(st.integers(0, 50256), min_size=1, max_size=4), seed=st.integers(0, 2**31 - 1))
def test_initial_past_with_no_step_equals_plain_generate_with_that_past(small, rows, head, seed):
    """A prefix past (here: random keys/values) reaches PPLM as it reaches minigpt.generate:
    with stepsize 0 the sampled tokens are the same, bit for bit, padded batch included."""
    ids, mask = padded(rows)
    g = torch.Generator().manual_seed(seed)
    L, H, hd = small.config.n_layer, small.config.n_head, small.config.head_dim
    past = tuple((torch.randn(len(rows), H, len(head), hd, generator=g),
                  torch.randn(len(rows), H, len(head), hd, generator=g)) for _ in range(L))
    out = pplm.generate(small, ids, attention_mask=mask, bow="space", max_new_tokens=3, stepsize=0.0,
                        do_sample=True, past_key_values=past, generator=torch.Generator().manual_seed(seed))
    ref = minigpt.generate(small, ids, attention_mask=mask, max_new_tokens=3, do_sample=True, top_k=10,
                           past_key_values=past, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(out.sequences, ref)


def test_prefix_of_own_keys_values_is_reading_those_tokens_first(tiny64):
    """The prefix-tuning identity, under PPLM: a past made of the model's own keys/values for tokens x,
    then prompt y, steers exactly as the prompt x + y does (BoW: the whole past moves in both)."""
    x, y = [50256, 464, 3290], [318, 257]
    with torch.no_grad():
        past = tiny64(torch.tensor([x])).past_key_values
    kw = dict(bow="space", max_new_tokens=5, stepsize=0.2, generator=None)
    a = pplm.generate(tiny64, torch.tensor([y]), past_key_values=past, **kw)
    b = pplm.generate(tiny64, torch.tensor([x + y]), **kw)
    assert torch.equal(a.sequences[:, len(y):], b.sequences[:, len(x + y):])
    assert torch.allclose(a.stacked("attribute_after"), b.stacked("attribute_after"), atol=1e-10)
    with pytest.raises(ValueError, match="n_positions"):
        pplm.generate(tiny64, torch.tensor([y]), past_key_values=past, bow="space", max_new_tokens=60)


# ---- steering away from a bag (ours, not the paper's) ---------------------------------------------------
@given(B=st.integers(1, 3), V=st.integers(3, 40), data=st.data())
def test_avoid_loss_is_minus_log_of_the_mass_left(B, V, data):
    probs = torch.tensor(data.draw(st.lists(st.lists(st.floats(0.01, 1), min_size=V, max_size=V),
                                            min_size=B, max_size=B)), dtype=torch.float64)
    probs = probs / probs.sum(-1, keepdim=True)
    bags = torch.zeros(2, V, dtype=torch.float64)
    bags[0, :V // 2] = 1
    bags[1, -1] = 1
    want = [-sum(math.log(1 - float(probs[b] @ bags[k])) for k in range(2)) for b in range(B)]
    assert torch.allclose(pplm.avoid_loss(probs, bags), torch.tensor(want, dtype=torch.float64), rtol=1e-12)
    full = torch.ones(1, V, dtype=torch.float64)  # a bag holding every word: mass 1, loss finite
    assert torch.isfinite(pplm.avoid_loss(probs, full)).all()


def test_avoiding_a_bag_lowers_its_mass(small):
    """The bag's probability mass under p̃ falls below its mass under p at every perturbed step."""
    ids = torch.tensor([[minigpt.EOT_ID, 464, 3290, 318]])
    out = pplm.generate(small, ids, avoid_bow="military", max_new_tokens=6, stepsize=0.1)
    before, after = out.stacked("attribute_before"), out.stacked("attribute_after")
    assert [b.name for b in out.avoid_bags] == ["military"] and not out.bags
    assert bool((after < before).all()), (before, after)


def test_cli_avoid_bow_runs(tmp_path, capsys):
    folder = tmp_path / "m"
    make_model().save_pretrained(folder)
    code = pplm_main(["--weights", str(folder), "--avoid-bow", "military", "--prompt", "The war", "--length", "4",
                      "--device", "cpu", "--no-color"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "avoided bag tokens" in out.out and "bag 'military'" in out.err
