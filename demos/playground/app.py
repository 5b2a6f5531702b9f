"""The gradio page of the playground: thin callbacks over core.py. Bad input (a PlaygroundError or any
ValueError from the library) shows as a message on the page; the server keeps serving."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from minigpt import GPT
from techniques import pplm

from . import core


def _message(e: Exception) -> str:
    return f"**Error:** {e}"


def build_app(model: GPT, model_line: str) -> gr.Blocks:
    """The page, over one shared model. Callbacks hold no state between calls: each session's settings
    live in its own widgets."""

    def generate(prompt, mode, max_new, temperature, top_k, top_p, seed, rep, ngram, stops):
        try:
            kw = dict(max_new_tokens=int(max_new), do_sample=mode == "sampling", temperature=float(temperature),
                      top_k=int(top_k) or None, top_p=float(top_p) if top_p < 1 else None, seed=int(seed),
                      repetition_penalty=float(rep), no_repeat_ngram_size=int(ngram), stop_text=stops)
            rows = core.next_token_table(model, prompt, temperature=kw["temperature"], top_k=kw["top_k"],
                                         top_p=kw["top_p"])
            table = [[repr(t), round(b, 4), round(a, 4)] for t, b, a in rows]
            text = ""
            for text in core.stream_text(model, prompt, **kw):
                yield text, table, ""
            yield text, table, "done"
        except ValueError as e:
            yield "", [], _message(e)

    def steer(prompt, bag, stepsize, iters, max_new, seed):
        try:
            s = core.steer_compare(model, prompt, bag, stepsize=float(stepsize), num_iterations=int(iters),
                                   max_new_tokens=int(max_new), seed=int(seed))
        except ValueError as e:
            return [], [], None, _message(e)
        plot = {"token": list(range(1, len(s.attribute) + 1)), "bag mass": s.attribute}
        return (core.highlight_spans(s.plain, s.bag_ids), core.highlight_spans(s.steered, s.bag_ids),
                pd.DataFrame(plot), f"{sum(i in s.bag_ids for i in s.steered)} bag tokens steered, "
                f"{sum(i in s.bag_ids for i in s.plain)} unsteered")

    with gr.Blocks(title="minigpt playground") as demo:
        gr.Markdown(f"# minigpt playground\n{model_line}")
        with gr.Tab("Generate"):
            prompt = gr.Textbox(label="Prompt", value="The king looked at the crowd and said", elem_id="prompt")
            with gr.Row():
                mode = gr.Radio(["sampling", "greedy"], value="sampling", label="Decoding")
                max_new = gr.Slider(1, 100, value=30, step=1, label="New tokens")
                seed = gr.Number(value=0, precision=0, label="Seed")
            with gr.Row():
                temperature = gr.Slider(0.1, 2.0, value=1.0, label="Temperature")
                top_k = gr.Slider(0, 100, value=0, step=1, label="Top-k (0 = off)")
                top_p = gr.Slider(0.05, 1.0, value=1.0, label="Top-p (1 = off)")
            with gr.Row():
                rep = gr.Slider(1.0, 2.0, value=1.0, label="Repetition penalty")
                ngram = gr.Slider(0, 5, value=0, step=1, label="No-repeat n-gram")
                stops = gr.Textbox(label="Stop strings (| separated)", value="")
            with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id="generate")
                stop_btn = gr.Button("Stop", elem_id="stop")
            msg = gr.Markdown(elem_id="gen-msg")
            with gr.Row():
                out = gr.Textbox(label="Continuation (streams)", lines=6, elem_id="gen-out")
                table = gr.Dataframe(headers=["next token", "p before filters", "p after filters"],
                                     label="Next-token distribution for the prompt")
            ev = go.click(generate, [prompt, mode, max_new, temperature, top_k, top_p, seed, rep, ngram, stops],
                          [out, table, msg])
            stop_btn.click(None, cancels=[ev])
        with gr.Tab("Steer (PPLM)"):
            sprompt = gr.Textbox(label="Prompt", value="The king looked at the crowd and said", elem_id="sprompt")
            with gr.Row():
                bag = gr.Dropdown(pplm.bag_names(), value="space", allow_custom_value=True,
                                  label="Bag of words (a shipped bag, or words separated by commas)", elem_id="bag")
                stepsize = gr.Slider(0.0, 2.0, value=0.5, label="Strength (PPLM step size)", elem_id="stepsize")
                iters = gr.Slider(1, 10, value=3, step=1, label="Iterations")
                smax = gr.Slider(1, 60, value=20, step=1, label="New tokens")
                sseed = gr.Number(value=0, precision=0, label="Seed")
            sgo = gr.Button("Steer", variant="primary", elem_id="steer")
            smsg = gr.Markdown(elem_id="steer-msg")
            with gr.Row():
                plain = gr.HighlightedText(label="Unsteered (same seed)", elem_id="plain")
                steered = gr.HighlightedText(label="Steered", elem_id="steered")
            splot = gr.LinePlot(x="token", y="bag mass", title="Steering signal: bag mass under the steered "
                                "distribution, per token", label="Bag mass per token", elem_id="splot")
            sgo.click(steer, [sprompt, bag, stepsize, iters, smax, sseed], [plain, steered, splot, smsg])
    return demo
