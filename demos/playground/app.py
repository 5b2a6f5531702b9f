"""The gradio page of the playground: thin callbacks over core.py. Bad input (a PlaygroundError or any
ValueError from the library) shows as a message on the page; the server keeps serving."""
from __future__ import annotations

import json
from typing import Sequence

import gradio as gr
import pandas as pd

from minigpt import GPT, get_tokenizer
from techniques import pplm

from . import core


def _message(e: Exception) -> str:
    return f"**Error:** {e}"


def _set_keys(config: dict) -> dict:
    return {k: v for k, v in config.items() if v not in (None, [], {})}


def _adapter_info(adapters) -> str:
    """Each adapter's parameter count, summary and config (the keys that are set: peft writes dozens of nulls)."""
    return "\n\n".join(f"**{a.path}** ({a.kind}): {a.parameters:,} parameters. {a.summary}\n\n```json\n"
                         f"{json.dumps(_set_keys(a.config), indent=1, sort_keys=True)}\n```" for a in adapters)


def _rating_plot(plain: list[float], steered: list[float], steered_name: str) -> pd.DataFrame:
    """Two lines for a gr.LinePlot: the head's p(target) per token of the unsteered and of the steered text."""
    return pd.DataFrame({"token": [*range(1, len(plain) + 1), *range(1, len(steered) + 1)],
                         "p(target)": [*plain, *steered],
                         "text": ["unsteered"] * len(plain) + [steered_name] * len(steered)})


def _end(xs: list[float]) -> float:
    return xs[-1] if xs else float("nan")


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def build_app(model: GPT, model_line: str, runs_dir: str = "runs", heads: Sequence[tuple[str, str]] = ()
              ) -> gr.Blocks:
    """The page, over one shared model. Callbacks hold no state between calls: each session's settings
    live in its own widgets, and adapters are loaded per request onto a copy (LoRA) or as a past (prefix).
    `heads`: (label, spec) of the attribute heads offered in the Steer tab (core.head_choices), the first the
    default."""
    default_head = heads[0][1] if heads else None

    # Sessions (gradio's session_hash, one per page) whose Stop was pressed during their run. The running
    # generation looks here after each token and ends as a finished run does. gradio's own `cancels=` kills the
    # task from outside instead, and then at times marks every output "Error", hiding the text made so far.
    stop_asked: set[str] = set()

    def stop(request: gr.Request):
        stop_asked.add(request.session_hash)

    def generate(prompt, mode, max_new, temperature, top_k, top_p, seed, rep, ngram, stops, beams, lp,
                 request: gr.Request):
        sid = request.session_hash
        stop_asked.discard(sid)                       # a Stop pressed before this run does not stop it
        try:
            kw = dict(max_new_tokens=int(max_new), do_sample=mode == "sampling", temperature=float(temperature),
                      top_k=int(top_k) or None, top_p=float(top_p) if top_p < 1 else None, seed=int(seed),
                      repetition_penalty=float(rep), no_repeat_ngram_size=int(ngram), stop_text=stops)
            filters = dict(temperature=kw["temperature"], top_k=kw["top_k"], top_p=kw["top_p"]) \
                if mode == "sampling" else {}            # greedy and beam search: no sampling filters
            rows, fig = core.next_token_panel(model, prompt, **filters)
            table = [[repr(t), round(b, 4), round(a, 4)] for t, b, a in rows]
            if mode == "beam search":
                text = core.beam_text(model, prompt, max_new_tokens=int(max_new), num_beams=int(beams),
                                      length_penalty=float(lp), repetition_penalty=float(rep),
                                      no_repeat_ngram_size=int(ngram), stop_text=stops)
                yield text, table, fig, "done"
                return
            text, stopped = "", False
            for text in core.stream_text(model, prompt, **kw):
                yield text, table, fig, ""
                if sid in stop_asked:
                    stopped = True
                    break
            stop_asked.discard(sid)
            yield text, table, fig, ("**Stopped** before the last token asked for: the text is what was made "
                                     "so far. Generate again when you like." if stopped else "done")
        except ValueError as e:
            yield "", [], None, _message(e)

    def steer(prompt, bag, stepsize, iters, max_new, seed):
        try:
            s = core.steer_compare(model, prompt, bag, stepsize=float(stepsize), num_iterations=int(iters),
                                   max_new_tokens=int(max_new), seed=int(seed))
        except ValueError as e:
            return [], [], None, _message(e)
        plot = {"token": list(range(1, len(s.attribute) + 1)), "bag mass": s.attribute}
        return (core.highlight_spans(s.plain, s.bag_ids), core.highlight_spans(s.steered, s.bag_ids),
                pd.DataFrame(plot), f"{sum(i in s.bag_ids for i in s.steered)} bag tokens steered, "
                f"{sum(i in s.bag_ids for i in s.plain)} unsteered (strength {float(stepsize):g})")

    def head_steer(prompt, head, target, stepsize, iters, max_new, seed):
        try:
            s = core.head_steer_compare(model, prompt, head, target, stepsize=float(stepsize),
                                        num_iterations=int(iters), max_new_tokens=int(max_new), seed=int(seed))
        except ValueError as e:
            return "", "", None, _message(e)
        tok = get_tokenizer()
        return (tok.decode(s.plain), tok.decode(s.steered), _rating_plot(s.plain_rating, s.steered_rating,
                                                                          "PPLM-steered"),
                f"PPLM with the head, strength {float(stepsize):g}, {int(iters)} iterations: the head's "
                f"p({target}) on the whole text is {_end(s.plain_rating):.2f} unsteered, "
                f"{_end(s.steered_rating):.2f} steered (mean over the tokens {_mean(s.plain_rating):.2f} vs "
                f"{_mean(s.steered_rating):.2f})")

    def jam(prompt, head, target, margin, max_new, seed):
        try:
            s = core.jam_compare(model, prompt, head, target, margin=float(margin), max_new_tokens=int(max_new),
                                 seed=int(seed))
        except ValueError as e:
            return "", "", None, _message(e)
        tok = get_tokenizer()
        return (tok.decode(s.plain), tok.decode(s.steered), _rating_plot(s.plain_rating, s.steered_rating,
                                                                          "JAM-steered"),
                f"JAM margin μ = {float(margin):g}: the head's p({target}) on the whole text is "
                f"{_end(s.plain_rating):.2f} unsteered, {_end(s.steered_rating):.2f} steered "
                f"(mean over the tokens {_mean(s.plain_rating):.2f} vs {_mean(s.steered_rating):.2f})")

    with gr.Blocks(title="minigpt playground") as demo:
        gr.Markdown(f"# minigpt playground\n{model_line}")
        with gr.Tab("Generate"):
            prompt = gr.Textbox(label="Prompt", value="The king looked at the crowd and said", elem_id="prompt")
            with gr.Row():
                mode = gr.Radio(["sampling", "greedy", "beam search"], value="sampling", label="Decoding")
                max_new = gr.Slider(1, 100, value=30, step=1, label="New tokens", elem_id="max-new")
                seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
            with gr.Row():
                temperature = gr.Slider(0.1, 2.0, value=1.0, label="Temperature")
                top_k = gr.Slider(0, 100, value=0, step=1, label="Top-k (0 = off)")
                top_p = gr.Slider(0.05, 1.0, value=1.0, label="Top-p (1 = off)")
            with gr.Row():
                rep = gr.Slider(1.0, 2.0, value=1.0, label="Repetition penalty")
                ngram = gr.Slider(0, 5, value=0, step=1, label="No-repeat n-gram")
                stops = gr.Textbox(label="Stop strings (| separated)", value="")
            with gr.Row():
                beams = gr.Slider(1, 8, value=4, step=1, label="Beams (beam search)")
                lp = gr.Slider(0.0, 2.0, value=1.0, label="Length penalty (beam search)")
            with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id="generate")
                stop_btn = gr.Button("Stop", elem_id="stop")
            msg = gr.Markdown(elem_id="gen-msg")
            with gr.Row():
                out = gr.Textbox(label="Continuation (streams)", lines=6, elem_id="gen-out")
                dist = gr.Plot(label="Next-token distribution for the prompt, before and after the filters",
                               show_label=False, elem_id="dist")      # the figure's own title says it
            table = gr.Dataframe(headers=["next token", "p before filters", "p after filters"],
                                 label="The same numbers")
            gen_inputs = [prompt, mode, max_new, temperature, top_k, top_p, seed, rep, ngram, stops, beams, lp]
            go.click(generate, gen_inputs, [out, table, dist, msg])
            stop_btn.click(stop, None, None, queue=False)    # not queued: it runs while the generation does
        with gr.Tab("Steer (PPLM, JAM)"):
            sprompt = gr.Textbox(label="Prompt", value="The king looked at the crowd and said", elem_id="sprompt")
            with gr.Row():
                bag = gr.Dropdown(pplm.bag_names(), value="space", allow_custom_value=True,
                                  label="Bag of words (a shipped bag, or words separated by commas)", elem_id="bag")
                stepsize = gr.Slider(0.0, 2.0, value=0.5, label="Strength (PPLM step size)", elem_id="stepsize")
                iters = gr.Slider(1, 10, value=3, step=1, label="Iterations")
                smax = gr.Slider(1, 60, value=20, step=1, label="New tokens", elem_id="smax")
                sseed = gr.Number(value=0, precision=0, label="Seed")
            sgo = gr.Button("Steer", variant="primary", elem_id="steer")
            smsg = gr.Markdown(elem_id="steer-msg")
            with gr.Row():
                plain = gr.HighlightedText(label="Unsteered (same seed)", elem_id="plain")
                steered = gr.HighlightedText(label="Steered", elem_id="steered")
            splot = gr.LinePlot(x="token", y="bag mass", title="Steering signal: bag mass under the steered "
                                "distribution, per token", label="Bag mass per token", elem_id="splot")
            sgo.click(steer, [sprompt, bag, stepsize, iters, smax, sseed], [plain, steered, splot, smsg])
            gr.Markdown(elem_id="pplm-head-intro", value="### PPLM with an attribute head\n"
                        "The same prompt, new tokens and seed as above. The head is a linear classifier on the mean "
                        "of this model's last hidden states; PPLM nudges its past along the gradient of the head's "
                        "log p(target class). Pick a head, or type a folder saved by python -m techniques.pplm "
                        "train-discriminator. Each iteration costs a backward pass per token: a few tokens first.")
            with gr.Row():
                phead = gr.Dropdown(list(heads), value=default_head, allow_custom_value=True,
                                    label="Attribute head (or a folder saved by train-discriminator)", elem_id="phead",
                                    scale=2, info=f"the first is saved in {default_head}" if default_head else None)
                ptarget = gr.Textbox(label="Target class", value="positive", elem_id="ptarget")
                pstep = gr.Slider(0.0, 1.0, value=0.1, step=0.01, label="Strength (PPLM step size)",
                                  elem_id="pstep")
                piters = gr.Slider(1, 10, value=3, step=1, label="Iterations", elem_id="piters")
            pgo = gr.Button("Steer with the head", variant="primary", elem_id="psteer")
            pmsg = gr.Markdown(elem_id="psteer-msg")
            with gr.Row():
                pplain = gr.Textbox(label="Unsteered (same seed)", lines=4, elem_id="pplm-plain")
                psteered = gr.Textbox(label="PPLM-steered towards the target class", lines=4, elem_id="pplm-steered")
            pplot = gr.LinePlot(x="token", y="p(target)", color="text",
                                title="The head's p(target) on the text so far, per token (the steering signal, "
                                "not an outside judge)", label="Head probability", elem_id="pplm-plot")
            pgo.click(head_steer, [sprompt, phead, ptarget, pstep, piters, smax, sseed],
                      [pplain, psteered, pplot, pmsg])
            gr.Markdown(elem_id="jam-intro",
                        value="### JAM: move the last hidden state across an attribute head's boundary\n"
                        "The same prompt, new tokens and seed as above. The head is a two-class linear classifier "
                        "on this model's hidden states (python -m techniques.pplm train-discriminator saves one); "
                        "each sampled position's state is moved until the head's log-odds for the target class "
                        "reach the margin μ.")
            with gr.Row():
                head = gr.Textbox(label="Two-class attribute head (a folder saved by train-discriminator, "
                                  "or a .pt head)", value=default_head, elem_id="head")
                target = gr.Textbox(label="Target class", value="positive", elem_id="target")
                jmargin = gr.Slider(-4.0, 8.0, value=2.0, step=0.5, label="Margin μ (log-odds, nats)",
                                    elem_id="margin")
            jgo = gr.Button("Steer with JAM", variant="primary", elem_id="jam")
            jmsg = gr.Markdown(elem_id="jam-msg")
            with gr.Row():
                jplain = gr.Textbox(label="Unsteered (same seed)", lines=4, elem_id="jam-plain")
                jsteered = gr.Textbox(label="JAM-steered", lines=4, elem_id="jam-steered")
            jplot = gr.LinePlot(x="token", y="p(target)", color="text",
                                title="The head's p(target) on the text so far, per token (the steering signal, "
                                "not an outside judge)", label="Head probability",
                                elem_id="jam-plot")

            jgo.click(jam, [sprompt, head, target, jmargin, smax, sseed], [jplain, jsteered, jplot, jmsg])
        with gr.Tab("Adapters"):
            gr.Markdown("Adapters (LoRA, prefix tuning: any peft-format folder) found under the runs folder, or added "
                        "by path. Tick one to switch it on; Compare samples the prompt with and without them from "
                        "the same seed.")
            with gr.Row():
                runs = gr.Textbox(label="Runs folder", value=runs_dir, elem_id="runs")
                scan = gr.Button("Scan", elem_id="scan")
                extra = gr.Textbox(label="Or an adapter folder", elem_id="adapter-path")
                add = gr.Button("Add", elem_id="add-adapter")
            on = gr.CheckboxGroup(core.find_adapters(runs_dir), label="Switched on", elem_id="adapters-on")
            aprompt = gr.Textbox(label="Prompt", value="The king looked at the crowd and said", elem_id="aprompt")
            with gr.Row():
                amax = gr.Slider(1, 60, value=20, step=1, label="New tokens")
                aseed = gr.Number(value=0, precision=0, label="Seed")
            ago = gr.Button("Compare", variant="primary", elem_id="compare")
            amsg = gr.Markdown(elem_id="adapter-msg")
            with gr.Row():
                base_out = gr.Textbox(label="Base model (adapters off)", lines=4, elem_id="base-out")
                adapted_out = gr.Textbox(label="With the adapters switched on (same seed)", lines=4,
                                         elem_id="adapted-out")
            ainfo = gr.Markdown(elem_id="adapter-info")

            def do_scan(folder, checked):
                found = core.find_adapters(folder)
                return gr.update(choices=sorted(set(found) | set(checked or [])), value=checked or []), \
                    f"{len(found)} adapter folder(s) under {folder}"

            def do_add(path, checked):
                try:
                    a = core.load_adapter_dir(model, path)
                except ValueError as e:
                    return gr.update(), _message(e), ""
                checked = sorted(set(checked or []) | {a.path})
                return gr.update(choices=checked, value=checked), f"added {a.path}", _adapter_info([a])

            def compare(prompt, checked, max_new, seed):
                try:
                    adapters = [core.load_adapter_dir(model, p) for p in checked or []]
                    base, adapted = core.with_and_without(model, prompt, adapters, seed=int(seed),
                                                          max_new_tokens=int(max_new))
                except ValueError as e:
                    return "", "", _message(e), ""
                state = "no adapter switched on: the two are the same" if not adapters else \
                    f"{len(adapters)} adapter(s) on"
                return base, adapted, state, _adapter_info(adapters)

            scan.click(do_scan, [runs, on], [on, amsg])
            add.click(do_add, [extra, on], [on, amsg, ainfo])
            ago.click(compare, [aprompt, on, amax, aseed], [base_out, adapted_out, amsg, ainfo])
        with gr.Tab("Inspect"):
            iprompt = gr.Textbox(label="Prompt", value="The old man gave the boy his book because he had finished it.",
                                 elem_id="iprompt")
            with gr.Row():
                layer = gr.Slider(0, model.config.n_layer - 1, value=model.config.n_layer // 2, step=1,
                                  label="Layer", elem_id="layer")
                ihead = gr.Slider(0, model.config.n_head - 1, value=0, step=1, label="Head", elem_id="ihead")
            igo = gr.Button("Show attention", variant="primary", elem_id="inspect")
            imsg = gr.Markdown(elem_id="inspect-msg")
            iplot = gr.Plot(label="Attention heatmap", show_label=False, elem_id="iplot")

            def inspect(prompt, layer, head):
                try:
                    labels, att, fig = core.attention_map(model, prompt, int(layer), int(head))
                except ValueError as e:
                    return None, _message(e)
                top = att[-1].argmax()
                return fig, f"{len(labels)} tokens; the last token attends most to {labels[top]!r} ({att[-1, top]:.2f})"

            igo.click(inspect, [iprompt, layer, ihead], [iplot, imsg])
    return demo
