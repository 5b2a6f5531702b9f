"""Step 4, prefix tuning on E2E (restaurant records -> sentences): P learned key/value vectors per layer,
trained through an MLP (the paper's reparametrisation) with the model frozen, then folded to a plain table.
It shows the loss curve against the model without a prefix, the outputs on held-out records before and after
(beam search as the paper decodes, and greedy), how many of each record's values they name, and the two
parameter counts (reparametrised, direct). The folded prefix and the held-out records stay on the context
(`ctx.prefix`, `ctx.e2e_held_out`) for step 6.
"""
from __future__ import annotations

import random

import torch

from minigpt import TrainConfig, collate_lm, evaluate, examples_from_pairs, lm_loss_fn
from minigpt.cli import describe_plan
from techniques.prefix import PrefixTuning, train_prefix

from ..kits import E2E, PREFIX_HIDDEN, e2e_prompt, group_by_mr, prefix_lr, read_e2e
from .context import StepResult, TourContext, _announce, _r
from .shared import _loss_figure, _sample_texts, mean_slot_recall

# Prefix tuning: the paper's P = 10 virtual tokens for table-to-text (E2E) and its MLP reparametrisation
# (Li & Liang 2021, sections 4.3 and 7.2, hidden width 512). The paper trains 5-10 epochs over 42k records at
# lr 5e-5 ... 5e-4; the tour has a few hundred steps, so it trains at a higher rate (demos.kits.prefix_lr).
PREFIX = {"num_virtual_tokens": 10, "projection": True, "hidden_size": PREFIX_HIDDEN}
PREFIX_BEAMS = 5  # the prefix-tuning paper decodes E2E with beam search, 5 beams (Li & Liang 2021, section 5.3)
E2E_MAX_TOKENS = 110   # prompt + completion tokens kept per record (the longest E2E pairs are ~100)


def e2e_data(seed: int, n_held_out: int) -> tuple[list[tuple[str, str]], list[str], dict[str, list[str]]]:
    """(the (mr, ref) rows of devset.csv, to train on; n held-out inputs of testset_w_refs.csv, a seeded
    choice; every held-out input's references)."""
    by_mr = group_by_mr(read_e2e(E2E / "testset_w_refs.csv"))
    held_out = sorted(by_mr)
    random.Random(seed).shuffle(held_out)
    return read_e2e(E2E / "devset.csv"), held_out[:n_held_out], by_mr


def step_prefix(ctx: TourContext) -> StepResult:
    """Step 4: train a prefix on E2E with the model frozen, measure it before and after; leaves the folded
    prefix in ctx.prefix and the held-out inputs in ctx.e2e_held_out."""
    s, tok, model = ctx.sizes, ctx.tokenizer, ctx.model
    P = PREFIX["num_virtual_tokens"]
    train_rows, held_out, by_mr = e2e_data(ctx.seed, s.prefix_eval_mrs)
    max_len = min(E2E_MAX_TOKENS, model.config.n_positions - P)
    train_ex = examples_from_pairs(tok, [(e2e_prompt(mr), " " + ref) for mr, ref in train_rows], max_len)
    eval_ex = examples_from_pairs(tok, [(e2e_prompt(mr), " " + ref) for mr in held_out for ref in by_mr[mr]],
                                  max_len)
    lr = prefix_lr(model)
    _announce(4, "Prefix tuning", f"P={P} virtual tokens (MLP-reparametrised) for E2E: `{e2e_prompt('mr')}` -> "
                                  f"` ref`; trained on {len(train_ex)} records of devset.csv, eval loss on the "
                                  f"{len(eval_ex)} references of {len(held_out)} held-out inputs of "
                                  f"testset_w_refs.csv, lr {lr:g}")
    torch.manual_seed(ctx.seed)
    prefix = PrefixTuning(model.config, P, projection=PREFIX["projection"],
                          hidden_size=PREFIX["hidden_size"]).to(ctx.device)
    n_reparam = sum(p.numel() for p in prefix.parameters())   # P'[P, d] + the MLP: what trains
    n_direct = sum(p.numel() for p in PrefixTuning(model.config, P).parameters())  # P_theta [P, 2·L·d]: folded
    config = TrainConfig(max_steps=s.prefix_steps, batch_size=s.prefix_batch, lr=lr,
                         eval_every=s.prefix_eval_every, seed=ctx.seed, progress=ctx.progress,
                         precision=ctx.precision)
    print(f"  trainable: {n_reparam:,} parameters (reparametrised: P'[{P}, {model.config.n_embd}] + MLP); "
          f"the direct table P_theta [P, 2·L·d] has {n_direct:,}; the model's {model.num_parameters():,} stay frozen")
    print(f"  {describe_plan(len(train_ex), len(eval_ex), config)}")
    plain = evaluate(lm_loss_fn(model), eval_ex, s.prefix_batch, collate_lm, ctx.device, [model])
    past_fn = lambda B: (prefix.past_key_values(B), P)
    prefix.eval()
    initial = evaluate(lm_loss_fn(model, past_fn=past_fn), eval_ex, s.prefix_batch, collate_lm, ctx.device, [model])
    print(f"  eval loss before training: {plain:.3f} nats/token without a prefix, {initial:.3f} with the untrained one")
    show_mrs = held_out[:s.samples]
    prompts = [e2e_prompt(mr) for mr in show_mrs]
    before = _sample_texts(ctx, model, prompts, s.prefix_tokens, 200, num_beams=PREFIX_BEAMS)
    before_greedy = _sample_texts(ctx, model, prompts, s.prefix_tokens, 200)
    history = train_prefix(model, prefix, train_ex, eval_examples=eval_ex, config=config)
    after_loss = history[-1]["eval_loss"]
    with torch.no_grad():
        folded = prefix.fold()
    after = _sample_texts(ctx, model, prompts, s.prefix_tokens, 200, past_fn=lambda: folded.past_key_values(1),
                          num_beams=PREFIX_BEAMS)
    after_greedy = _sample_texts(ctx, model, prompts, s.prefix_tokens, 200,
                                 past_fn=lambda: folded.past_key_values(1))
    print(f"  eval loss after training: {after_loss:.3f} nats/token (no prefix: {plain:.3f})")
    for mr, b, a, g in zip(show_mrs, before, after, after_greedy):
        print(f"  {mr}\n    before (beam {PREFIX_BEAMS}): {b!r}\n    after (beam {PREFIX_BEAMS}):  {a!r}\n"
              f"    after (greedy):  {g!r}")
    ctx.prefix = folded
    ctx.e2e_held_out = held_out
    fig = _loss_figure(history, initial, ctx.out / "prefix_loss.png",
                       f"Prefix tuning on E2E: loss (P={P}, {n_reparam:,} trainable parameters)",
                       baseline=("eval, no prefix", plain))
    numbers = {"eval_loss_before": _r(plain), "eval_loss_init": _r(initial), "eval_loss_after": _r(after_loss),
               "P": P, "parameters_direct": n_direct, "parameters_reparametrised": n_reparam,
               "hidden_size": PREFIX["hidden_size"], "steps": len(history), "lr": lr, "train_records": len(train_ex),
               "eval_references": len(eval_ex), "eval_inputs": len(held_out),
               "slot_recall_before": mean_slot_recall(show_mrs, before),
               "slot_recall_after": mean_slot_recall(show_mrs, after),
               "decoding": f"beam {PREFIX_BEAMS}",
               "slot_recall_before_greedy": mean_slot_recall(show_mrs, before_greedy),
               "slot_recall_after_greedy": mean_slot_recall(show_mrs, after_greedy),
               "outputs": [{"mr": mr, "before": b, "after": a, "before_greedy": bg, "after_greedy": ag}
                           for mr, b, a, bg, ag in zip(show_mrs, before, after, before_greedy, after_greedy)]}
    report = [("text", (f"A prefix of P = {P} learned key/value vectors per layer, reparametrised through an MLP "
                        f"({n_reparam:,} trainable parameters; folded to the direct table P_theta it is {n_direct:,} "
                        f"numbers). Eval loss on the references of {len(held_out)} held-out inputs: no prefix "
                        f"{plain:.3f}, untrained prefix {initial:.3f}, trained {after_loss:.3f} nats/token.")),
              ("image", fig, "Prefix-tuning loss (the dashed line: the model without a prefix)."),
              ("table", ["held-out input (mr)", f"before: no prefix (beam {PREFIX_BEAMS})",
                         f"after: with the prefix (beam {PREFIX_BEAMS})", "after: with the prefix (greedy)"],
               [[mr, b, a, g] for mr, b, a, g in zip(show_mrs, before, after, after_greedy)]),
              ("text", (f"Decoded as the paper did, beam search with {PREFIX_BEAMS} beams. Share of each input's "
                        f"values named in the output: {100 * numbers['slot_recall_before']:.0f}% before, "
                        f"{100 * numbers['slot_recall_after']:.0f}% after (greedy: "
                        f"{100 * numbers['slot_recall_before_greedy']:.0f}% -> "
                        f"{100 * numbers['slot_recall_after_greedy']:.0f}%)."))]
    return StepResult("prefix", "Prefix tuning", numbers, [fig], report)
