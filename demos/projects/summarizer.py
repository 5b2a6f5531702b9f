"""News summarizer, made real: a prefix that turns a paper's abstract into its one-sentence outcome.

The tutorial's "news summarizer" kept an article's first 50 characters and added "...". Here a
prefix is trained for a real summarization task that ships offline: ACLSum (Takeshita et al. 2024,
`pip install aclsum`, MIT), ACL papers with a one-sentence summary per aspect; this project maps
the abstract to the "outcome" summary (what the paper found). Input ` {abstract} TL;DR:` (GPT-2's
zero-shot summarization cue, Radford et al. 2019), target ` {outcome}<|endoftext|>`, loss on the
target only; the prefix trains on ACLSum's train split (100 papers), the loss curve is on its val
split (50) and the score on its test split (100). Before = the same `TL;DR:` prompt with no prefix
(zero-shot); after = with the prefix; both greedy, and both outputs cut the same way: at
<|endoftext|>, a newline, or the end of the first sentence (the target is one sentence). Yardstick:
ROUGE-1/2/L F1 from Google's `rouge_score` (use_stemmer=True), averaged over the test papers, x100;
the headline is ROUGE-L. Hyperparameters and where the small model forced a change: the paper uses
P = 200 for summarization (on BART/XSUM); that leaves no room for an abstract in the bundled
model's 256 positions, so models with fewer than 1024 positions use P = 20. The abstracts (whose
sentences ACLSum stores tokenised, "( NER ) ." style, which we undo) are cut to the budget left
after the prefix, the cue and the summary by dropping whole sentences from the START: the outcome
is what an abstract says last. The lr follows `prefix_lr` (the paper's 5e-5..8e-5 on big models;
3e-3 for the bundled tiny model's few hundred steps).
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Optional, Sequence

from minigpt import GPT, examples_from_pairs, get_tokenizer

from ..kits import complete, fit_prefix, heldout_loss, load_prefix, mean, save_prefix
from .common import (Finished, Project, ProjectResult, ProjectRun, Samples, add_prefix_args, loss_figure,
                     prefix_training, require)

__all__ = ["NAME", "TITLE", "PROJECT", "run", "Paper", "read_aclsum", "detokenize", "fit_abstract", "summary_prompt",
           "first_sentence", "rouge_f1", "default_P"]

NAME = "summarizer"
TITLE = "News summarizer (ACLSum outcome)"

CUE = " TL;DR:"
ASPECT = "outcome"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
P_PAPER, P_SMALL = 200, 20   # the paper's summarization prefix length; ours below 1024 positions


@dataclass
class Paper:
    id: str
    sentences: list[str]     # the abstract's sentences, detokenised
    summary: str             # the one-sentence outcome summary


@dataclass
class Sizes:
    val: Optional[int]       # papers scored for the validation loss (None = all 50)
    test: Optional[int]      # test papers summarised and scored (None = all 100)
    train: Optional[int]     # training papers (None = all 100)
    steps: int
    eval_every: int
    new_tokens: int          # the longest outcome summary is 42 tokens
    shown: int


SIZES = {"full": Sizes(None, None, None, 120, 30, 48, 6),
         "quick": Sizes(20, 40, None, 40, 20, 48, 4),
         "smoke": Sizes(2, 3, 3, 2, 2, 6, 2)}


# ---- the data ----------------------------------------------------------------------------------
def detokenize(sentence: str) -> str:
    """Undo ACLSum's tokenised spacing: "model ( NER ) , which ." -> "model (NER), which."."""
    s = re.sub(r"\s+([.,;:!?%)\]])", r"\1", sentence)
    s = re.sub(r"([(\[])\s+", r"\1", s)
    s = re.sub(r"\s+(n't|'s|'re|'ve|'ll|'d)\b", r"\1", s)
    return s.strip()


def read_aclsum(split: str, limit: Optional[int] = None) -> list[Paper]:
    """ACLSum's split ("train", "val", "test") -> papers with their abstract and outcome summary."""
    aclsum = require("aclsum", "aclsum")
    docs = list(aclsum.ACLSum(split))[:limit]
    return [Paper(d.id, [detokenize(s) for s in d.sentences["abstract"]], d.summaries[ASPECT].strip()) for d in docs]


def default_P(model: GPT) -> int:
    return P_PAPER if model.config.n_positions >= 1024 else P_SMALL


def fit_abstract(tok, sentences: Sequence[str], budget: int) -> str:
    """The abstract's last sentences that fit in `budget` tokens (with their leading space); a single
    last sentence longer than the budget keeps its last `budget` tokens."""
    kept: list[str] = []
    for s in reversed(sentences):
        if len(tok.encode(" " + " ".join([s] + kept))) > budget:
            break
        kept.insert(0, s)
    if kept:
        return " ".join(kept)
    return tok.decode(tok.encode(" " + sentences[-1])[-budget:]).strip()


def summary_prompt(abstract: str) -> str:
    return f" {abstract}{CUE}"


def first_sentence(text: str) -> str:
    """The output as a one-sentence summary: up to the first newline, then the first sentence end."""
    line = text.strip().split("\n")[0]
    m = re.search(r"[.!?](?=\s|$)", line)
    return (line[:m.end()] if m else line).strip()


def rouge_f1(scorer, reference: str, summary: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 (x100) of one summary against its reference."""
    scores = scorer.score(reference, summary)   # rouge_score's order: (target, prediction)
    return {k: 100.0 * scores[k].fmeasure for k in ROUGE_TYPES}


# ---- the project -------------------------------------------------------------------------------
def add_options(p: argparse.ArgumentParser) -> None:
    add_prefix_args(p, P=None, P_note=f"{P_PAPER}, the paper's for summarization, on models with 1024 positions or "
                                      f"more; {P_SMALL} on smaller ones such as tiny (256 positions)",
                    steps={k: v.steps for k, v in SIZES.items()})


def _papers(size: Sizes) -> tuple[list[Paper], list[Paper], list[Paper]]:
    """ACLSum's train, val and test papers at this run's sizes."""
    return tuple(read_aclsum(s, n) for s, n in (("train", size.train), ("val", size.val), ("test", size.test)))


def preflight(args, size: Sizes) -> tuple[list[Paper], list[Paper], list[Paper]]:
    """Both yardstick packages before the model loads: rouge_score, and aclsum by reading the papers."""
    require("rouge_score.rouge_scorer", "rouge-score")
    return _papers(size)   # (train, val, test), handed to run


def run(run: ProjectRun) -> Finished:
    """ROUGE of the zero-shot `TL;DR:` summaries and of the prefix's, on the same test papers."""
    args, size, model, tok = run.args, run.sizes, run.model, get_tokenizer()
    rouge = require("rouge_score.rouge_scorer", "rouge-score")
    train_docs, val_docs, test_docs = run.prepared

    prefix_run = load_prefix(model, args.prefix) if args.prefix else None
    P = prefix_run.prefix.num_virtual_tokens if prefix_run else (args.num_virtual_tokens or default_P(model))
    budget = model.config.n_positions - P - size.new_tokens - len(tok.encode(CUE))
    if budget < 16:
        raise ValueError(f"a prefix of P={P} and {size.new_tokens} summary tokens leave {budget} of the model's "
                         f"{model.config.n_positions} positions for the abstract; use a shorter prefix")
    pairs = lambda docs: [(summary_prompt(fit_abstract(tok, d.sentences, budget)), " " + d.summary)  # noqa: E731
                          for d in docs]
    max_len = model.config.n_positions - P
    train_ex = examples_from_pairs(tok, pairs(train_docs), max_len)
    val_ex = examples_from_pairs(tok, pairs(val_docs), max_len)
    test_prompts = [p for p, _ in pairs(test_docs)]
    print(f"ACLSum ({ASPECT}): {len(train_ex)} train / {len(val_ex)} val / {len(test_prompts)} test papers; "
          f"abstracts cut to {budget} tokens; greedy, up to {size.new_tokens} new tokens")

    loss_before = heldout_loss(model, val_ex)
    ids = [tok.encode(p) for p in test_prompts]
    before = [first_sentence(t) for t in complete(model, ids, max_new_tokens=size.new_tokens)]
    if prefix_run is None:
        prefix_run = fit_prefix(model, train_ex, val_ex, P=P, eval_every=size.eval_every,
                                **prefix_training(args, size.steps))
    loss_after = heldout_loss(model, val_ex, prefix_run.prefix)
    after = [first_sentence(t) for t in complete(model, ids, max_new_tokens=size.new_tokens, prefix=prefix_run.prefix)]

    scorer = rouge.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    s_before = [rouge_f1(scorer, d.summary, s) for d, s in zip(test_docs, before)]
    s_after = [rouge_f1(scorer, d.summary, s) for d, s in zip(test_docs, after)]
    means = {f"{k}_{when}": round(mean([s[k] for s in scores]), 3)
            for when, scores in (("before", s_before), ("after", s_after)) for k in ROUGE_TYPES}
    result = ProjectResult(NAME, "ROUGE-L F1", True, means["rougeL_before"], means["rougeL_after"], run.chosen.name,
                           len(test_docs), run.clock.elapsed(),
                           extra={**means, "val_loss_before": round(loss_before, 4),
                                  "val_loss_after": round(loss_after, 4),
                                  "P": P, "abstract_budget_tokens": budget, "train_papers": len(train_ex),
                                  "decoding": "greedy, first sentence", "prefix": prefix_run.how,
                                  "rouge": "rouge_score F1 x100, use_stemmer=True, mean over test papers"})

    table = " ".join(f"{k}: {means[k + '_before']:.2f} -> {means[k + '_after']:.2f};" for k in ROUGE_TYPES)
    note = (f"ACLSum abstract -> one-sentence outcome summary. Prompt `{summary_prompt('{abstract}')}` "
            f"(abstract cut to its last sentences that fit {budget} tokens), greedy, the output's first sentence. "
            f"Before = zero-shot (no prefix), after = prefix ({prefix_run.how}). ROUGE F1 x100 on "
            f"{len(test_docs)} test papers (rouge_score, stemmed): {table} validation loss {loss_before:.3f} -> "
            f"{loss_after:.3f} nats/token. Model: {run.chosen.name}. The paper's summarization prefix is P = "
            f"{P_PAPER} on BART; this run uses P = {P}"
            + (f" because the model has only {model.config.n_positions} positions." if P != P_PAPER else "."))
    samples = Samples(f"{TITLE}: samples (greedy, the same inputs before and after)",
                      [{"input": p.strip(), "reference": d.summary, "before": b, "after": a,
                        "before_score": f"ROUGE-L {sb['rougeL']:.1f}", "after_score": f"ROUGE-L {sa['rougeL']:.1f}"}
                       for p, d, b, a, sb, sa in zip(test_prompts, test_docs, before, after, s_before, s_after)
                       ][:size.shown], note=note)
    files = []
    if prefix_run.history:   # a prefix trained here (a loaded one is not written again)
        out = run.folder()
        loss_figure(out, prefix_run.history, f"Prefix tuning on ACLSum outcome summaries (P={P}): loss on the summary")
        save_prefix(prefix_run, out / "adapter", run.chosen.name)
        files = ["loss.png", "adapter/"]
    print(f"ROUGE-1 {means['rouge1_before']:.2f} -> {means['rouge1_after']:.2f}, ROUGE-2 "
          f"{means['rouge2_before']:.2f} -> {means['rouge2_after']:.2f} on {len(test_docs)} test papers")
    return Finished(result, samples, labels=("zero-shot TL;DR", "prefix"), unit="F1 x100",
                    per_item=([s["rougeL"] for s in s_before], [s["rougeL"] for s in s_after]), files=files)


PROJECT = Project(
    name=NAME, title=TITLE, technique="prefix tuning", run=run, sizes=SIZES,
    description="Prefix tuning for summarization: ACLSum abstract -> one-sentence outcome summary, ' {abstract} "
                "TL;DR:' zero-shot vs with a trained prefix, scored with ROUGE-1/2/L F1 (rouge_score).",
    needs=("aclsum", "rouge-score"), options=add_options, preflight=preflight)


if __name__ == "__main__":
    raise SystemExit(PROJECT.main())
