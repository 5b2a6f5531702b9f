"""QA on a SQuAD-style set (the tutorial's prefix exercise): context + question -> answer, scored by
SQuAD's own exact match and F1.

The tutorial only names the exercise ("QA with SQuAD subset"). Here a prefix is trained to answer
` {context} Q: {question} A:` with ` {answer}<|endoftext|>` (loss on the answer, the first gold
answer of each training question). The loader reads the OFFICIAL SQuAD v1.1 JSON layout
(data -> paragraphs -> qas -> answers), so `--data` can point at the real dev-v1.1.json; SQuAD
itself (CC BY-SA 4.0) is not available offline, so the default is data/squad_mini/, a 128-question
set in that layout written for the project (see its README), split by article title in its
splits.json (96 train / 32 test questions). Without a splits file the articles are split 80/20 in
file order. Yardstick: exact match and F1 exactly as the official evaluate-v1.1.py defines them
(Rajpurkar et al. 2016): both strings are normalised (lower-case; drop the characters of Python's
string.punctuation; replace the whole words a/an/the by spaces; collapse whitespace), EM = the
normalised strings are equal, F1 = the harmonic mean of token precision and recall over the bag
of normalised tokens (0 when no token is shared); each question takes the max over its gold
answers, and the totals are means x100. Our code, written from that definition (see `normalize`,
`exact_match`, `f1`). Before = the same prompt, no prefix; both decode greedily (up to 24 tokens,
cut at <|endoftext|> or a newline). Headline F1; EM in extra. Hyperparameters: the paper's P = 10
(its table-to-text length; the paper has no QA setting) and MLP reparametrisation; lr per
`prefix_lr` (3e-3 for the bundled model's few hundred steps, not the paper's 5e-5..8e-5 on GPT-2
medium). Contexts longer than the model's window keep their first tokens; a training question
whose first answer falls outside that window is left out (counted in extra).
"""
from __future__ import annotations

import argparse
import json
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from minigpt import examples_from_pairs, get_tokenizer

from ..kits import complete, fit_prefix, heldout_loss, load_prefix, save_prefix
from .common import (REPO, Finished, Project, ProjectResult, ProjectRun, Samples, add_prefix_args, loss_figure,
                     prefix_training)

__all__ = ["NAME", "TITLE", "PROJECT", "run", "Question", "load_squad", "read_splits", "split_questions", "normalize",
           "exact_match", "f1", "best_over_gold", "squad_scores", "qa_prompt"]

NAME = "squad_qa"
TITLE = "QA on a SQuAD-format set"

P_QA = 10


# ---- SQuAD v1.1's own metric (evaluate-v1.1.py), from its definition ------------------------------
PUNCTUATION = frozenset(string.punctuation)
ARTICLE = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """SQuAD v1.1's answer normalisation, in its order: lower-case, remove punctuation characters,
    replace the words a/an/the by a space, then collapse runs of whitespace to single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLE.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize(prediction) == normalize(gold))


def f1(prediction: str, gold: str) -> float:
    """Token F1 over the normalised bags of words; 0 when they share no token (also when one is empty)."""
    pred, ref = normalize(prediction).split(), normalize(gold).split()
    shared = sum((Counter(pred) & Counter(ref)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(pred), shared / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_over_gold(metric, prediction: str, golds: Sequence[str]) -> float:
    """A question's score: the best over its gold answers."""
    return max(metric(prediction, g) for g in golds)


def squad_scores(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> tuple[float, float]:
    """(exact match, F1), each the mean over questions x100, as the official script reports them."""
    if not predictions or len(predictions) != len(golds):
        raise ValueError(f"need one prediction per question, got {len(predictions)} for {len(golds)}")
    em = sum(best_over_gold(exact_match, p, g) for p, g in zip(predictions, golds))
    f = sum(best_over_gold(f1, p, g) for p, g in zip(predictions, golds))
    return 100.0 * em / len(golds), 100.0 * f / len(golds)


# ---- the official JSON layout ---------------------------------------------------------------------
@dataclass
class Question:
    id: str
    title: str
    context: str
    question: str
    answers: list[str]        # the gold answers, the first being the main one
    answer_start: int         # the first answer's character offset in the context


def _need(cond: bool, path: Path, where: str, what: str) -> None:
    if not cond:
        raise ValueError(f"{path}: {where}: {what} (expected the official SQuAD v1.1 layout: "
                         '{"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", '
                         '"answers": [{"text", "answer_start"}]}]}]}]})')


def load_squad(path: str | Path) -> list[Question]:
    """Every question of a SQuAD v1.1 JSON file (train-v1.1.json, dev-v1.1.json or one in their layout).
    Errors name the file and the place in it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass --data with a SQuAD v1.1 JSON file (e.g. dev-v1.1.json)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    _need(isinstance(doc, dict) and isinstance(doc.get("data"), list), path, "top level", "no 'data' list")
    out = []
    for a, article in enumerate(doc["data"]):
        where = f"data[{a}]"
        _need(isinstance(article, dict) and isinstance(article.get("paragraphs"), list), path, where,
              "an article needs a 'paragraphs' list")
        title = str(article.get("title", f"article {a}"))
        for p, para in enumerate(article["paragraphs"]):
            where = f"data[{a}].paragraphs[{p}]"
            _need(isinstance(para, dict) and isinstance(para.get("context"), str) and isinstance(para.get("qas"), list),
                  path, where, "a paragraph needs a 'context' string and a 'qas' list")
            for q, qa in enumerate(para["qas"]):
                where = f"data[{a}].paragraphs[{p}].qas[{q}]"
                _need(isinstance(qa, dict) and isinstance(qa.get("question"), str), path, where, "no 'question'")
                answers = qa.get("answers")
                _need(isinstance(answers, list) and len(answers) > 0
                      and all(isinstance(x, dict) and isinstance(x.get("text"), str) for x in answers),
                      path, where, "'answers' must be a non-empty list of {'text', 'answer_start'}")
                start = answers[0].get("answer_start", -1)
                out.append(Question(str(qa.get("id", where)), title, para["context"], qa["question"],
                                    [x["text"] for x in answers], start if isinstance(start, int) else -1))
    if not out:
        raise ValueError(f"{path} holds no questions")
    return out


def read_splits(path: Path) -> dict[str, list[str]]:
    """splits.json: {"train": [titles], "test": [titles]}."""
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg})") from None
    if not (isinstance(splits, dict) and all(isinstance(splits.get(k), list) for k in ("train", "test"))):
        raise ValueError(f'{path}: expected {{"train": [titles], "test": [titles]}}')
    return splits


def split_questions(questions: Sequence[Question], splits: Optional[dict[str, list[str]]]
                    ) -> tuple[list[Question], list[Question]]:
    """(train, test) by article title: the splits file's, or else the first 80% of the articles train."""
    titles = list(dict.fromkeys(q.title for q in questions))
    if splits is None:
        cut = max(1, min(len(titles) - 1, round(0.8 * len(titles))))
        splits = {"train": titles[:cut], "test": titles[cut:]}
    train_t, test_t = set(splits["train"]), set(splits["test"])
    train = [q for q in questions if q.title in train_t]
    test = [q for q in questions if q.title in test_t and q.title not in train_t]
    if not train or not test:
        raise ValueError(f"the split leaves {len(train)} training and {len(test)} test questions; both need some "
                         "(check the titles in the splits file)")
    return train, test


def qa_prompt(context: str, question: str) -> str:
    return f" {context} Q: {question} A:"


# ---- the project -------------------------------------------------------------------------------
@dataclass
class Sizes:
    train_q: Optional[int]     # training questions (None = all)
    test_q: Optional[int]      # scored questions (None = all)
    steps: int
    eval_every: int
    new_tokens: int
    shown: int


SIZES = {"full": Sizes(None, None, 150, 30, 24, 8),
         "quick": Sizes(None, None, 60, 20, 24, 5),
         "smoke": Sizes(6, 3, 2, 2, 6, 2)}


def add_options(p: argparse.ArgumentParser) -> None:
    add_prefix_args(p, P=P_QA, P_note=f"{P_QA}, the paper's table-to-text length",
                    steps={k: v.steps for k, v in SIZES.items()})
    p.add_argument("--data", metavar="FILE", default=str(REPO / "data" / "squad_mini" / "dev-mini-v1.1.json"),
                   help="a SQuAD v1.1 JSON file, e.g. the official dev-v1.1.json (default: "
                        "data/squad_mini/dev-mini-v1.1.json, written for the project)")
    p.add_argument("--splits", metavar="FILE", default=None,
                   help="{\"train\": [titles], \"test\": [titles]} (default: splits.json beside --data if it is "
                        "there, else the first 80%% of the articles train and the rest are scored)")


def _fit_context(tok, q: Question, budget: int) -> tuple[str, bool]:
    """The context cut to its first `budget` tokens, and whether the first gold answer is still in it."""
    ids = tok.encode(" " + q.context)
    if len(ids) <= budget:
        return q.context, True
    kept = tok.decode(ids[:budget]).strip()
    inside = 0 <= q.answer_start and q.answer_start + len(q.answers[0]) <= len(kept)
    return kept, inside


def _questions(args, size: Sizes) -> tuple[list[Question], list[Question]]:
    """--data's (train, test) questions, split by --splits (else splits.json beside it), at this run's sizes."""
    data = Path(args.data)
    questions = load_squad(data)
    splits_path = Path(args.splits) if args.splits else data.parent / "splits.json"
    if args.splits and not splits_path.is_file():
        raise FileNotFoundError(f"--splits {splits_path} not found")
    train_q, test_q = split_questions(questions, read_splits(splits_path) if splits_path.is_file() else None)
    return train_q[:size.train_q], test_q[:size.test_q]


def preflight(args, size: Sizes) -> tuple[list[Question], list[Question]]:
    """A bad --data or --splits file fails before the model loads; the questions go on to run."""
    return _questions(args, size)


def run(run: ProjectRun) -> Finished:
    """SQuAD's F1 and exact match of the answers with no prefix and with a trained prefix, on the same questions."""
    args, size, model, tok = run.args, run.sizes, run.model, get_tokenizer()
    data = Path(args.data)
    train_q, test_q = run.prepared

    prefix_run = load_prefix(model, args.prefix) if args.prefix else None
    P = prefix_run.prefix.num_virtual_tokens if prefix_run else args.num_virtual_tokens
    room = model.config.n_positions - P - size.new_tokens   # tokens for the context, question and cue

    def prompt_of(q: Question) -> tuple[str, bool]:
        tail = len(tok.encode(f" Q: {q.question} A:"))
        if room - tail < 8:
            raise ValueError(f"question {q.id}: the prefix (P={P}), the question and {size.new_tokens} answer tokens "
                             f"leave no room for the context in {model.config.n_positions} positions")
        context, inside = _fit_context(tok, q, room - tail)
        return qa_prompt(context, q.question), inside

    train_pairs, dropped = [], 0
    for q in train_q:
        prompt, inside = prompt_of(q)
        if inside:
            train_pairs.append((prompt, " " + q.answers[0]))
        else:
            dropped += 1
    if not train_pairs:
        raise ValueError(f"{data}: no training question keeps its answer inside the model's window")
    max_len = model.config.n_positions - P
    train_ex = examples_from_pairs(tok, train_pairs, max_len)
    test_prompts = [prompt_of(q)[0] for q in test_q]
    test_ex = examples_from_pairs(tok, [(p, " " + q.answers[0]) for p, q in zip(test_prompts, test_q)], max_len)
    print(f"QA ({data.name}): {len(train_ex)} training questions ({dropped} left out: answer beyond the window), "
          f"{len(test_q)} scored; greedy, up to {size.new_tokens} tokens")

    golds = [q.answers for q in test_q]
    ids = [tok.encode(p) for p in test_prompts]
    loss_before = heldout_loss(model, test_ex)
    before = [t.strip().split("\n")[0].strip() for t in complete(model, ids, max_new_tokens=size.new_tokens)]
    if prefix_run is None:
        prefix_run = fit_prefix(model, train_ex, test_ex, P=P, eval_every=size.eval_every,
                                **prefix_training(args, size.steps))
    loss_after = heldout_loss(model, test_ex, prefix_run.prefix)
    after = [t.strip().split("\n")[0].strip()
             for t in complete(model, ids, max_new_tokens=size.new_tokens, prefix=prefix_run.prefix)]
    em_before, f1_before = squad_scores(before, golds)
    em_after, f1_after = squad_scores(after, golds)

    result = ProjectResult(NAME, "F1 (SQuAD)", True, f1_before, f1_after, run.chosen.name, len(test_q),
                           run.clock.elapsed(),
                           extra={"em_before": round(em_before, 3), "em_after": round(em_after, 3),
                                  "answer_loss_before": round(loss_before, 4),
                                  "answer_loss_after": round(loss_after, 4),
                                  "train_questions": len(train_ex), "train_left_out": dropped, "P": P,
                                  "data": data.name, "decoding": "greedy", "prefix": prefix_run.how,
                                  "metric": "SQuAD v1.1 EM and F1 (official definitions), mean x100"})
    note = (f"Prompt `{qa_prompt('{context}', '{question}')}`, greedy, the answer up to <|endoftext|> or a newline. "
            f"SQuAD v1.1 metrics (official definitions, max over the gold answers, x100) on {len(test_q)} test "
            f"questions of {data.name}: **F1 {f1_before:.1f} -> {f1_after:.1f}**, EM {em_before:.1f} -> "
            f"{em_after:.1f}; "
            f"answer loss {loss_before:.3f} -> {loss_after:.3f} nats/token. Model {run.chosen.name}; prefix: "
            f"{prefix_run.how}. The paper's lr (5e-5..8e-5) is for GPT-2 medium over thousands of steps; narrower "
            "models use prefix_lr's higher rate."
            + (" data/squad_mini is written for the project in SQuAD's format (not SQuAD's text): its scores are "
               "not comparable with published SQuAD numbers." if data.parent.name == "squad_mini" else ""))
    scored = lambda pred, gold: (f"EM {100 * best_over_gold(exact_match, pred, gold):.0f}, "  # noqa: E731
                                 f"F1 {100 * best_over_gold(f1, pred, gold):.0f}")
    samples = Samples(f"{TITLE}: samples (greedy, the same inputs before and after)",
                      [{"input": f"{q.context}\n\nQ: {q.question}", "reference": " | ".join(q.answers),
                        "before": b or "(empty)", "after": a or "(empty)",
                        "before_score": scored(b, q.answers), "after_score": scored(a, q.answers)}
                       for q, b, a in list(zip(test_q, before, after))[:size.shown]], note=note)
    files = []
    if prefix_run.history:   # a prefix trained here (a loaded one is not written again)
        out = run.folder()
        loss_figure(out, prefix_run.history, f"Prefix tuning for QA (P={P}): loss on the answer")
        save_prefix(prefix_run, out / "adapter", run.chosen.name)
        files = ["loss.png", "adapter/"]
    print(f"F1 {f1_before:.1f} -> {f1_after:.1f}, EM {em_before:.1f} -> {em_after:.1f} on {len(test_q)} questions")
    return Finished(result, samples, labels=("no prefix", "prefix"), unit="x100",
                    per_item=([100 * best_over_gold(f1, b, g) for b, g in zip(before, golds)],
                              [100 * best_over_gold(f1, a, g) for a, g in zip(after, golds)]), files=files)


PROJECT = Project(
    name=NAME, title=TITLE, technique="prefix tuning", run=run, sizes=SIZES,
    description="Prefix tuning for extractive QA (' {context} Q: {question} A:' -> answer) on a SQuAD v1.1-format "
                "set, scored by SQuAD's exact match and F1 (the official definitions; no extra package needed).",
    needs=(),   # the yardstick is SQuAD's definition, implemented here: no package to install
    options=add_options, preflight=preflight)


if __name__ == "__main__":
    raise SystemExit(PROJECT.main())
