"""Table-to-text on E2E, the prefix-tuning paper's own benchmark, measured with sacrebleu's BLEU.

The tutorial's prefix section trains nothing (its loss curve is `np.exp` plus noise). This project
trains a prefix for real on the task Li & Liang (2021) report first: an E2E restaurant record (a
"meaning representation", mr) -> a sentence. The input is ` {mr} <|endoftext|>` and the target
` {ref}<|endoftext|>`, with the loss on the target only (the paper's format). The prefix is the
paper's: P = 10 virtual tokens, reparametrised through an MLP of width 512 (section 4.3), folded to
the plain table P_theta after training. It trains on data/e2e/devset.csv (4,672 rows; the 42k-row
train set is not shipped) and is measured on testset_w_refs.csv grouped by mr (630 inputs, several
references each): corpus BLEU from `sacrebleu.corpus_bleu` with all the references of every input.
Before = the same prompt with no prefix. Decoding is the paper's, beam search with beam 5 (the headline
BLEU); greedy decoding's BLEU is reported beside it.
The paper's prefix on GPT-2 medium (355M parameters) scores BLEU 69.7 on E2E in its arXiv
version's Table 1 (fine-tuning 68.2) and 70.3 in the ACL 2021 version that data/e2e/README.md cites
(fine-tuning 68.8), trained on the full 42k-row train set (5 epochs) and scored with the E2E
challenge's own script; this run is far smaller in model (the bundled tiny model has 19.2M
parameters), data (4.7k rows) and steps, so its BLEU is comparable only to its own "before".
Where the small model forced a change: the paper's lr (5e-5 to 8e-5 for GPT-2 medium) suits
thousands of steps; a few hundred steps on a model narrower than 512 train at 3e-3 (5e-4 for gpt2;
the paper's 8e-5 from width 1024 up); see `prefix_lr`.

The prefix plumbing the four prefix-tuning projects share (summarizer, explainer, squad_qa) lives
here too: the options, train-or-load, greedy batched completion and the held-out loss.
"""
from __future__ import annotations

import argparse
import csv
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from minigpt import (EOT_ID, Example, GPT, TrainConfig, collate_lm, evaluate, examples_from_pairs, generate,
                     get_tokenizer, left_pad, lm_loss_fn, resolve_precision)
from minigpt.cli import describe_plan, positive_int, run_command
from techniques.prefix import PrefixTuning, load_adapter, save_adapter, train_prefix

from ..common import Stopwatch, choose_model, format_seconds
from .common import (REPO, ProjectResult, loss_figure, metric_figure, project_parser, require, write_metrics,
                     write_samples)

__all__ = ["NAME", "TITLE", "TECHNIQUE", "NEEDS", "build_parser", "run", "main", "read_e2e", "group_by_mr",
           "e2e_prompt", "corpus_bleu", "paper_table", "PAPER_E2E", "PREFIX_HIDDEN", "prefix_lr", "add_prefix_args",
           "run_mode",
           "PrefixRun", "fit_prefix", "load_prefix", "complete", "heldout_loss", "save_prefix"]

NAME = "table_to_text"
NUM_BEAMS = 5  # the prefix-tuning paper's decoding (Li & Liang 2021, section 5.3)
TITLE = "Table-to-text (E2E)"
TECHNIQUE = "prefix tuning"
TRAINS = True
NEEDS = ("sacrebleu",)

EOT = "<|endoftext|>"
P_E2E = 10            # the paper's prefix length for table-to-text (Li & Liang 2021, section 7.2 / appendix A)
# The paper's GPT-2 medium numbers on E2E (beam 5, the 42k-row train set, the E2E challenge's scoring script).
# arXiv v1 (Table 1) reports prefix 69.7 / fine-tuning 68.2 (a reimplementation's report quotes the same);
# data/e2e/README.md cites 70.3 / 68.8 from the ACL 2021 version's table. Both are shown, with their source.
PAPER_E2E = {"prefix-tuning (0.1%), GPT-2 medium, arXiv v1 Table 1": 69.7,
             "fine-tuning, GPT-2 medium, arXiv v1 Table 1": 68.2,
             "prefix-tuning, GPT-2 medium, ACL 2021 version (as data/e2e/README.md cites)": 70.3,
             "fine-tuning, GPT-2 medium, ACL 2021 version (as data/e2e/README.md cites)": 68.8}


# ==== the prefix plumbing the four prefix projects share ========================================
PREFIX_HIDDEN = 512   # the reparametrisation MLP's hidden width (the paper's, section 4.3 and appendix A)


def prefix_lr(model: GPT) -> float:
    """Peak learning rate: the paper's 8e-5 from GPT-2 medium's width (1024) up; a few hundred steps on
    narrower models need more (5e-4 for gpt2's 768, 3e-3 below 512, e.g. the bundled tiny model)."""
    d = model.config.n_embd
    return 8e-5 if d >= 1024 else 5e-4 if d >= 512 else 3e-3


def run_mode(args) -> str:
    return "smoke" if args.smoke else "quick" if args.quick else "full"


def add_prefix_args(parser: argparse.ArgumentParser, *, P: Optional[int], P_note: str, steps: dict[str, int],
                    prefix_help: str = "load the prefix adapter a run saved in OUT/adapter (peft's layout) "
                                       "instead of training one") -> None:
    """--prefix, --num-virtual-tokens, --max-steps, --batch-size, --lr, --no-progress."""
    g = parser.add_argument_group("prefix tuning")
    g.add_argument("--prefix", metavar="DIR", help=prefix_help)
    g.add_argument("--num-virtual-tokens", type=positive_int, default=P, metavar="P",
                   help=f"P, the prefix length (default: {P_note})")
    g.add_argument("--max-steps", type=positive_int, default=None, metavar="N",
                   help=f"optimizer steps (default: {steps['full']}; {steps['quick']} with --quick, "
                        f"{steps['smoke']} with --smoke)")
    g.add_argument("--batch-size", type=positive_int, default=None, metavar="N", help="examples per step (default: 8)")
    g.add_argument("--lr", type=float, default=None,
                   help="AdamW peak learning rate, linear decay to 0 (default: the paper's 8e-5 for GPT-2 medium "
                        "and wider, 5e-4 for gpt2, 3e-3 for narrower models such as tiny)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


@dataclass
class PrefixRun:
    """A prefix ready to use (folded to its table, eval mode) and how it came to be."""
    prefix: PrefixTuning
    history: list[dict]      # the training history; empty when loaded
    how: str                 # one line for samples.md and metrics.json
    lr: Optional[float] = None
    steps: int = 0


def load_prefix(model: GPT, directory: str | Path) -> PrefixRun:
    prefix = load_adapter(model, directory).eval()
    return PrefixRun(prefix, [], f"loaded from {directory} (P={prefix.num_virtual_tokens})")


def fit_prefix(model: GPT, args, train_ex: Sequence[Example], eval_ex: Sequence[Example], *, P: int, steps: int,
               eval_every: int, label: str = "") -> PrefixRun:
    """Train a reparametrised prefix of P virtual tokens with train_prefix (--max-steps, --batch-size, --lr
    override `steps`, 8 and prefix_lr); return it folded to its table."""
    lr = args.lr if args.lr is not None else prefix_lr(model)
    if lr <= 0:
        raise ValueError(f"--lr must be > 0, got {lr}")
    steps = args.max_steps or steps
    config = TrainConfig(max_steps=steps, batch_size=args.batch_size or 8, lr=lr, eval_every=min(eval_every, steps),
                         seed=args.seed, progress=not args.no_progress,
                         precision=resolve_precision(args.precision, model.device))
    torch.manual_seed(args.seed)
    prefix = PrefixTuning(model.config, P, projection=True, hidden_size=PREFIX_HIDDEN).to(model.device)
    n = sum(p.numel() for p in prefix.parameters())
    print(f"{label}prefix: P={P} virtual tokens, reparametrised (P'[{P}, {model.config.n_embd}] + MLP of width "
          f"{PREFIX_HIDDEN}): {n:,} trainable parameters, the model's {model.num_parameters():,} frozen; lr {lr:g}")
    print(f"{label}{describe_plan(len(train_ex), len(eval_ex), config)}")
    history = train_prefix(model, prefix, list(train_ex), eval_examples=list(eval_ex), config=config)
    with torch.no_grad():
        folded = prefix.fold().eval()
    return PrefixRun(folded, history, f"trained here: P={P}, reparametrised (MLP width {PREFIX_HIDDEN}), "
                                      f"{steps} steps of batch {config.batch_size}, lr {lr:g}", lr, steps)


def save_prefix(run: PrefixRun, directory: Path, model_name: str) -> Optional[Path]:
    """Save a prefix trained here (peft's layout); a loaded one is not written again."""
    if not run.history:
        return None
    return save_adapter(run.prefix, directory, base_model_name_or_path=model_name)


def _until_eot(ids: Sequence[int]) -> list[int]:
    ids = list(ids)
    return ids[:ids.index(EOT_ID)] if EOT_ID in ids else ids


@torch.no_grad()
def complete(model: GPT, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             prefix: Optional[PrefixTuning] = None, batch_size: int = 32, num_beams: int = 1) -> list[str]:
    """Greedy (or, with num_beams > 1, beam-search) continuation of each prompt (token ids), up to
    <|endoftext|>: the new text only.

    Prompts are batched by length (left-padded; minigpt.generate gives each row the tokens it would
    get alone) and returned in the order given. Neither needs a generator: the same prompt gives the
    same output before and after, whatever the batch."""
    tok = get_tokenizer()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = left_pad([prompts[i] for i in chunk], EOT_ID, model.device)     # (B, T)
        past = prefix.past_key_values(len(chunk)) if prefix is not None else None   # L x (k, v) [B, nh, P, hs]
        seq = generate(model, ids, attention_mask=mask, past_key_values=past, max_new_tokens=max_new_tokens,
                       eos_token_id=EOT_ID, pad_token_id=EOT_ID, num_beams=num_beams)  # (B, T + new)
        for i, row in zip(chunk, seq[:, ids.size(1):].tolist()):
            texts[i] = tok.decode(_until_eot(row))
    return texts


def heldout_loss(model: GPT, examples: Sequence[Example], prefix: Optional[PrefixTuning] = None,
                 batch_size: int = 8) -> float:
    """Mean cross-entropy (nats/token) on the examples' target tokens, with or without the prefix."""
    past_fn = None if prefix is None else (lambda B: (prefix.past_key_values(B), prefix.num_virtual_tokens))
    return evaluate(lm_loss_fn(model, past_fn=past_fn), list(examples), batch_size, collate_lm, model.device, [model])


# ==== E2E =======================================================================================
@dataclass
class Sizes:
    train_rows: Optional[int]   # devset rows to train on (None = all 4,672)
    steps: int
    eval_every: int
    loss_mrs: int               # test inputs whose references give the held-out loss curve
    test_mrs: Optional[int]     # test inputs decoded and scored (None = all 630)
    new_tokens: int
    shown: int                  # inputs shown in samples.md


SIZES = {"full": Sizes(None, 400, 100, 20, None, 48, 8),    # 48 new tokens: 95% of the references are <= 44
         "quick": Sizes(None, 150, 50, 10, 150, 48, 5),
         "smoke": Sizes(16, 2, 2, 1, 3, 6, 2)}


def read_e2e(path: Path) -> list[tuple[str, str]]:
    """An E2E CSV (columns mr, ref) -> (mr, ref) rows."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this project needs the E2E records (data/e2e in the "
                                "repository, or --data DIR with devset.csv and testset_w_refs.csv)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"mr", "ref"} <= set(rows[0]):
        raise ValueError(f"{path}: expected a CSV with columns mr, ref")
    return [(r["mr"].strip(), r["ref"].strip()) for r in rows]


def group_by_mr(rows: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """mr -> its references, in the file's order (the test set has several per input)."""
    groups: dict[str, list[str]] = {}
    for mr, ref in rows:
        groups.setdefault(mr, []).append(ref)
    return groups


def e2e_prompt(mr: str) -> str:
    return f" {mr} {EOT}"


def corpus_bleu(sacrebleu, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu's corpus BLEU (0-100, its default 13a tokenisation) with every reference of every input.
    sacrebleu takes reference *streams*; inputs with fewer references fill the later streams with None."""
    width = max(len(r) for r in references)
    streams = [[r[k] if k < len(r) else None for r in references] for k in range(width)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)


def paper_table(model_name: str, n_params: int, n_train: int, how: str, before: float, after: float,
                greedy: tuple[float, float]) -> str:
    """samples.md's table: the paper's GPT-2 medium numbers beside this run's, with model and data sizes."""
    paper_rows = [(name.split(",")[0], name.split(", ", 2)[2], v) for name, v in PAPER_E2E.items()]
    rows = [f"| {system} (paper: {source}) | GPT-2 medium, 355M | E2E train, 42k rows, 5 epochs | beam 5 | "
            f"E2E challenge script | {v} |" for system, source, v in paper_rows]
    ours = f"{model_name}, {n_params / 1e6:.1f}M"
    trained = f"devset.csv, {n_train:,} rows; {how}"
    rows += [f"| no prefix (this run) | {ours} | none | beam {NUM_BEAMS} | sacrebleu | {before:.2f} |",
             f"| no prefix (this run) | {ours} | none | greedy | sacrebleu | {greedy[0]:.2f} |",
             f"| prefix-tuning (this run) | {ours} | {trained} | beam {NUM_BEAMS} | sacrebleu | {after:.2f} |",
             f"| prefix-tuning (this run) | {ours} | {trained} | greedy | sacrebleu | {greedy[1]:.2f} |"]
    return ("| system | model | training data | decoding | BLEU scorer | BLEU |\n|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


def _one_line(text: str) -> str:
    """The output's first non-empty line (E2E references are one line; the model may start with a newline)."""
    return text.strip().split("\n")[0].strip()


def build_parser() -> argparse.ArgumentParser:
    p = project_parser(NAME, "Prefix tuning on E2E (restaurant record -> sentence), the prefix-tuning paper's "
                             "benchmark: BLEU (sacrebleu, all references) with no prefix vs a trained prefix, "
                             "greedy decoding.", needs=NEEDS)
    add_prefix_args(p, P=P_E2E, P_note=f"{P_E2E}, the paper's for table-to-text",
                    steps={k: v.steps for k, v in SIZES.items()})
    p.add_argument("--data", metavar="DIR", default=str(REPO / "data" / "e2e"),
                   help="folder with devset.csv (training) and testset_w_refs.csv (scored) (default: data/e2e)")
    return p


def run(args) -> ProjectResult:
    watch = Stopwatch()
    sacrebleu = require("sacrebleu", "sacrebleu")
    size = SIZES[run_mode(args)]
    data = Path(args.data)
    train_rows = read_e2e(data / "devset.csv")
    tests = group_by_mr(read_e2e(data / "testset_w_refs.csv"))
    chosen = choose_model(args)
    print(chosen.reason)
    model, tok = chosen.model, get_tokenizer()

    mrs = list(tests)
    random.Random(args.seed).shuffle(mrs)
    loss_mrs, test_mrs = mrs[:size.loss_mrs], mrs[:size.test_mrs] if size.test_mrs else mrs
    rows = train_rows[:size.train_rows] if size.train_rows else train_rows
    prefix_run = load_prefix(model, args.prefix) if args.prefix else None
    P = prefix_run.prefix.num_virtual_tokens if prefix_run else args.num_virtual_tokens
    max_len = model.config.n_positions - P
    train_ex = examples_from_pairs(tok, [(e2e_prompt(mr), " " + ref) for mr, ref in rows], max_len)
    loss_ex = examples_from_pairs(tok, [(e2e_prompt(mr), " " + ref) for mr in loss_mrs for ref in tests[mr]], max_len)
    prompts = [tok.encode(e2e_prompt(mr)) for mr in test_mrs]
    new_tokens = min(size.new_tokens, model.config.n_positions - P - max(map(len, prompts)))
    if new_tokens < 1:
        raise ValueError(f"the longest E2E input ({max(map(len, prompts))} tokens) and the prefix (P={P}) fill the "
                         f"model's {model.config.n_positions} positions; use a shorter prefix")
    print(f"E2E: training on {len(train_ex)} rows of devset.csv; scoring {len(test_mrs)} inputs of "
          f"testset_w_refs.csv ({sum(len(tests[m]) for m in test_mrs)} references), beam {NUM_BEAMS} and greedy, "
          f"up to {new_tokens} tokens")

    def decode(prefix=None) -> tuple[list[str], list[str]]:
        """(beam-search outputs, greedy outputs), one line each."""
        return tuple([_one_line(t) for t in complete(model, prompts, max_new_tokens=new_tokens, prefix=prefix,
                                                       num_beams=k)] for k in (NUM_BEAMS, 1))

    loss_before = heldout_loss(model, loss_ex)
    before, greedy_before = decode()
    if prefix_run is None:
        prefix_run = fit_prefix(model, args, train_ex, loss_ex, P=P, steps=size.steps, eval_every=size.eval_every)
    prefix = prefix_run.prefix
    loss_after = heldout_loss(model, loss_ex, prefix)
    after, greedy_after = decode(prefix)
    refs = [tests[mr] for mr in test_mrs]
    bleu_before, bleu_after = corpus_bleu(sacrebleu, before, refs), corpus_bleu(sacrebleu, after, refs)
    greedy_bleu = (corpus_bleu(sacrebleu, greedy_before, refs), corpus_bleu(sacrebleu, greedy_after, refs))

    ours = (f"{chosen.name} ({model.num_parameters():,} parameters), {len(train_ex)} training rows "
            f"(devset.csv), {prefix_run.how}")
    result = ProjectResult(NAME, "BLEU", True, bleu_before, bleu_after, chosen.name, len(test_mrs), watch.elapsed(),
                           extra={"loss_before": round(loss_before, 4), "loss_after": round(loss_after, 4),
                                  "loss_references": len(loss_ex), "train_rows": len(train_ex),
                                  "references": sum(len(r) for r in refs), "P": P, "decoding": f"beam {NUM_BEAMS}",
                                  "greedy_bleu_before": round(greedy_bleu[0], 4),
                                  "greedy_bleu_after": round(greedy_bleu[1], 4),
                                  "prefix": prefix_run.how, "paper_bleu": PAPER_E2E})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    note = (f"Prefix tuning on E2E: ` {{mr}} {EOT}` -> ` {{ref}}{EOT}`. Corpus BLEU on {len(test_mrs)} test inputs "
            f"(all their references), beam {NUM_BEAMS}: **{bleu_before:.2f} before** (no prefix) -> "
            f"**{bleu_after:.2f} after**; greedy: {greedy_bleu[0]:.2f} -> {greedy_bleu[1]:.2f}. "
            f"Held-out loss on {len(loss_ex)} test references: {loss_before:.3f} -> {loss_after:.3f} nats/token.\n\n"
            + paper_table(chosen.name, model.num_parameters(), len(train_ex), prefix_run.how, bleu_before, bleu_after,
                          greedy_bleu)
            + f"\nThis run: {ours}. The paper's lr is 5e-5 to 8e-5 on GPT-2 medium; models narrower than 512 train "
              "at 3e-3 here because they get a few hundred steps, not 5 epochs of 42k rows. Like the paper, this run "
              "decodes with beam 5 (length penalty 1, no n-gram blocking). sacrebleu's BLEU (13a tokenisation, case-sensitive) is close to, "
              "not the same as, the E2E challenge script's.")
    write_samples(out, f"{TITLE}: samples (beam {NUM_BEAMS}, the same inputs before and after)",
                  [{"input": mr, "reference": "\n".join(tests[mr][:3]), "before": b, "after": a}
                   for mr, b, a in zip(test_mrs[:size.shown], before, after)], note=note)
    metric_figure(out, result, labels=("no prefix", "prefix"), unit="sacrebleu, 0-100")
    if prefix_run.history:
        loss_figure(out, prefix_run.history, f"Prefix tuning on E2E (P={P}): loss on the references")
    save_prefix(prefix_run, out / "adapter", chosen.name)
    result.seconds = watch.elapsed()
    write_metrics(result, out)
    print(f"BLEU (beam {NUM_BEAMS}) {bleu_before:.2f} -> {bleu_after:.2f}, greedy {greedy_bleu[0]:.2f} -> "
          f"{greedy_bleu[1]:.2f} on {len(test_mrs)} inputs; held-out loss {loss_before:.3f} -> "
          f"{loss_after:.3f}; {format_seconds(result.seconds)}; wrote {out}")
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args), out=args.out)


if __name__ == "__main__":
    raise SystemExit(main())
