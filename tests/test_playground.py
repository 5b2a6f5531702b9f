"""The playground (demos/playground): its plain functions on a random-weight GPT-2-shaped model, and the page
in a real browser (headless Debian chromium through Playwright), skipped only where chromium is absent."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import torch

from demos import tour
from demos.kits import new_lora_model
from demos.playground import core
from minigpt import GPT, beam_search, get_tokenizer
from techniques import pplm
from techniques.lora import save_adapter as save_lora
from techniques.peft_format import read_adapter_weights
from techniques.prefix import PrefixTuning, save_adapter as save_prefix
from tests.helpers import ODD_HEADS, TINY, make_hf_model

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("pg") / "m"
    make_hf_model(d, **TINY)
    return GPT.from_pretrained(str(d)).eval()


def test_stream_grows_and_is_seeded(model):
    texts = list(core.stream_text(model, "Hello there", max_new_tokens=6, seed=3))
    assert 1 <= len(texts) <= 6
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))
    assert texts == list(core.stream_text(model, "Hello there", max_new_tokens=6, seed=3))


def test_bad_inputs_have_messages(model):
    with pytest.raises(core.PlaygroundError, match="empty"):
        core.encode_prompt(model, "   ")
    with pytest.raises(core.PlaygroundError, match="context"):
        core.encode_prompt(model, "word " * 80, 10)
    with pytest.raises(ValueError, match="single GPT-2 token"):
        core.bag_from_text("zzqxjvwk, qqqpzxxy")


def _figure_data(fig) -> list:
    """What a figure shows, axes by axes: titles, labels, tick labels, bars, texts, line points and images."""
    out = [fig.get_suptitle()]
    for ax in fig.axes:
        out.append((ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), [t.get_text() for t in ax.get_yticklabels()],
                    [t.get_text() for t in ax.get_xticklabels()],
                    [(round(p.get_width(), 7), p.get_facecolor()) for p in ax.patches],
                    [t.get_text() for t in ax.texts], [ln.get_xydata().round(7).tolist() for ln in ax.lines],
                    [im.get_array().filled(-1).round(7).tolist() for im in ax.images]))
    return out


def test_next_token_panel_is_the_tours_figure(model):
    rows, fig = core.next_token_panel(model, "Hello there", top_k=3, bars=10)
    before = [b for _, b, _ in rows]
    assert len(rows) == 10 and before == sorted(before, reverse=True)
    assert sum(a > 0 for _, _, a in rows) == 3          # top-k 3 keeps three
    assert abs(sum(a for _, _, a in rows) - 1) < 1e-5
    ids = core.encode_prompt(model, "Hello there")
    with torch.no_grad():
        ref = model(ids).logits[0, -1].softmax(-1)
    assert [get_tokenizer().decode([i]) for i in ref.topk(10).indices.tolist()] == [t for t, _, _ in rows]
    # the tour's own function, called here with the same settings, draws the very same figure
    tour_fig = tour.next_token_figure(model, ids, top_k=3, bars=10, title=fig.get_suptitle())
    assert _figure_data(fig) == _figure_data(tour_fig)
    left, right = fig.axes
    assert right.get_title() == "T=1, top-k=3, top-p=off" and left.get_ylabel() == "next token (␣ = space)"
    assert [round(p.get_width(), 6) for p in left.patches] == [round(b, 6) for b in before]
    # and with other settings it draws another one (the comparison above can fail)
    assert _figure_data(core.next_token_panel(model, "Hello there", top_k=5)[1]) != _figure_data(fig)


def test_steer_changes_text_same_seed(model):
    s0 = core.steer_compare(model, "Hello there", "space", stepsize=0.0, max_new_tokens=6, seed=1)
    assert s0.plain == s0.steered                        # strength 0 is the unsteered run
    s = core.steer_compare(model, "Hello there", "space", stepsize=5.0, max_new_tokens=6, seed=1)
    assert s.plain == s0.plain and s.steered != s.plain
    assert len(s.attribute) == 6 and all(0 <= a <= 1 for a in s.attribute)


def _head_dir(n_embd: int, folder: Path, classes=("negative", "positive"), scale: float = 20.0) -> Path:
    """A random two-class head saved as train-discriminator saves one; scaled so it has a clear direction."""
    torch.manual_seed(5)
    head = pplm.Discriminator(n_embd, list(classes), "test")
    with torch.no_grad():
        head.mlp.weight.mul_(scale)
    head.save(folder)
    return folder


def test_jam_compare_is_the_library_jam_from_one_seed(model, tmp_path):
    head_dir = _head_dir(32, tmp_path / "head")
    never = core.jam_compare(model, "Hello there", str(head_dir), margin=-1e9, max_new_tokens=8, seed=2)
    assert never.plain == never.steered                  # every state already past μ: no move, the same text
    s = core.jam_compare(model, "Hello there", str(head_dir), margin=4.0, max_new_tokens=8, seed=2)
    assert s.plain == never.plain and s.steered != s.plain
    head = pplm.load_discriminator(str(head_dir))
    ids = torch.cat([torch.tensor([[50256]]), core.encode_prompt(model, "Hello there")], 1)
    ref = pplm.steered_generate(model, ids, max_new_tokens=8, adjust=pplm.jam_adjust(model, head, "positive",
                                pplm.JAMConfig(4.0)), top_k=10, generator=torch.Generator().manual_seed(2))
    assert s.steered == ref[0, ids.size(1):].tolist()
    assert len(s.steered_rating) == len(s.plain_rating) == 8 and all(0 <= p <= 1 for p in s.steered_rating)
    assert sum(s.steered_rating) > sum(s.plain_rating)   # the head rates the moved text higher


def test_head_steer_is_the_library_pplm_from_one_seed(model, tmp_path):
    head_dir = _head_dir(32, tmp_path / "head")
    never = core.head_steer_compare(model, "Hello there", str(head_dir), stepsize=0.0, num_iterations=2,
                                    max_new_tokens=6, seed=2)
    assert never.plain == never.steered                  # strength 0: the unsteered run, the same text
    s = core.head_steer_compare(model, "Hello there", str(head_dir), stepsize=0.5, num_iterations=2,
                                max_new_tokens=6, seed=2)
    assert s.plain == never.plain and s.steered != s.plain
    head = pplm.load_discriminator(str(head_dir))
    ids = torch.cat([torch.tensor([[50256]]), core.encode_prompt(model, "Hello there")], 1)
    ref = pplm.generate(model, ids, discriminator=head, class_label="positive", max_new_tokens=6, stepsize=0.5,
                        num_iterations=2, do_sample=True, gamma=1.0, gm_scale=0.95, kl_scale=0.01,
                        generator=torch.Generator().manual_seed(2))
    assert s.steered == ref.sequences[0, ids.size(1):].tolist()
    assert len(s.steered_rating) == len(s.plain_rating) == 6 and all(0 <= p <= 1 for p in s.steered_rating)
    assert sum(s.steered_rating) > sum(s.plain_rating)   # the head rates the steered text higher
    # PPLM takes heads of any number of classes (JAM: two); bad heads and classes have messages
    three = _head_dir(32, tmp_path / "three", ("a", "b", "c"))
    assert len(core.head_steer_compare(model, "Hi", str(three), "c", stepsize=0.1, num_iterations=1,
                                       max_new_tokens=2).steered) == 2
    with pytest.raises(core.PlaygroundError, match="not one of this head's classes"):
        core.head_steer_compare(model, "Hi", str(head_dir), "joyful", stepsize=0.1)
    with pytest.raises(core.PlaygroundError, match="n_embd=64"):
        core.head_steer_compare(model, "Hi", str(_head_dir(64, tmp_path / "big")), stepsize=0.1)
    with pytest.raises(core.PlaygroundError, match="No attribute head"):
        core.head_steer_compare(model, "Hi", "", stepsize=0.1)


def test_sst2_head_trained_once_then_loaded(model, tmp_path, capsys):
    folder, line = core.sst2_head(model, tmp_path / "sst2", rows=48, dev_rows=16, epochs=2, progress=False)
    assert "48 rows, dev accuracy" in line and "training a sentiment head" in capsys.readouterr().out
    head = core.load_head(model, folder, "positive")
    assert head.class_names == ["negative", "positive"] and head.n_embd == 32
    again, line2 = core.sst2_head(model, folder, rows=48, progress=False)
    assert again == folder and line2.startswith("SST-2 head: loaded from")
    assert "training" not in capsys.readouterr().out
    choices = core.head_choices(model, folder)
    assert choices[0][1] == folder and len(choices) == 1  # the paper's heads read n_embd 1024, not this model's


def test_jam_bad_heads_have_messages(model, tmp_path):
    with pytest.raises(core.PlaygroundError, match="No attribute head"):
        core.jam_compare(model, "Hello", " ")
    with pytest.raises(core.PlaygroundError, match="n_embd=64"):
        core.jam_compare(model, "Hello", str(_head_dir(64, tmp_path / "big")))
    with pytest.raises(core.PlaygroundError, match="two-class head"):
        core.jam_compare(model, "Hello", str(_head_dir(32, tmp_path / "three", ("a", "b", "c"))))
    with pytest.raises(core.PlaygroundError, match="not one of this head's classes"):
        core.jam_compare(model, "Hello", str(_head_dir(32, tmp_path / "two")), "joyful")
    with pytest.raises(core.PlaygroundError, match="unknown discriminator"):
        core.jam_compare(model, "Hello", str(tmp_path))


def test_beam_text_is_the_best_beam(model):
    text = core.beam_text(model, "Hello there", max_new_tokens=5, num_beams=3)
    ids = core.encode_prompt(model, "Hello there", 5)
    ref = beam_search(model, ids, max_new_tokens=5, num_beams=3, eos_token_id=50256, pad_token_id=50256)
    assert text == get_tokenizer().decode([t for t in ref.sequences[0, ids.size(1):].tolist() if t != 50256])
    with pytest.raises(core.PlaygroundError, match="beams"):
        core.beam_text(model, "Hello there", num_beams=0)


def _lora_dir(base: GPT, folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    lora = new_lora_model(base)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if ".B." in name:
                p.normal_(0, 0.5)          # a trained-looking B: the adapter changes the output
    save_lora(lora, folder)
    return folder


@pytest.fixture(scope="module")
def adapters(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    lora = _lora_dir(model, root / "poem-lora")
    torch.manual_seed(1)
    prefix = PrefixTuning(model.config, 3)
    with torch.no_grad():
        prefix.load_table_(torch.randn_like(prefix.table()) * 2)
    save_prefix(prefix, root / "e2e-prefix")
    other = GPT.from_pretrained(str(make_hf_model(tmp_path_factory.mktemp("odd") / "m", **ODD_HEADS)[1]))
    wrong = _lora_dir(other, tmp_path_factory.mktemp("wrong") / "odd-lora")
    return root, lora, root / "e2e-prefix", wrong


def test_adapters_found_loaded_and_switched(model, adapters):
    root, lora_dir, prefix_dir, _ = adapters
    assert core.find_adapters(root) == sorted([str(lora_dir), str(prefix_dir)])
    lora, prefix = core.load_adapter_dir(model, str(lora_dir)), core.load_adapter_dir(model, str(prefix_dir))
    saved = sum(t.numel() for t in read_adapter_weights(lora_dir).values())
    assert lora.kind == "LORA" and lora.config["peft_type"] == "LORA" and lora.parameters == saved
    assert prefix.kind == "PREFIX_TUNING" and prefix.parameters == 3 * 2 * 2 * 32
    base, off = core.with_and_without(model, "Hello there", [], seed=4, max_new_tokens=8)
    assert base == off                                   # switched off: the base model's text
    base_l, on_l = core.with_and_without(model, "Hello there", [lora], seed=4, max_new_tokens=8)
    base_p, on_p = core.with_and_without(model, "Hello there", [prefix], seed=4, max_new_tokens=8)
    assert base_l == base_p == base and on_l != base and on_p != base
    # the shared model was never changed by loading or using the LoRA (it works on a copy)
    assert not any(".A." in n or ".B." in n for n, _ in model.named_parameters())
    assert core.with_and_without(model, "Hello there", [], seed=4, max_new_tokens=8)[1] == base


def test_bad_adapters_have_messages(model, adapters, tmp_path):
    _, lora_dir, _, wrong = adapters
    with pytest.raises(core.PlaygroundError, match="not an adapter folder"):
        core.load_adapter_dir(model, str(tmp_path))
    with pytest.raises(core.PlaygroundError, match="does not fit this model"):
        core.load_adapter_dir(model, str(wrong))
    lora = core.load_adapter_dir(model, str(lora_dir))
    with pytest.raises(core.PlaygroundError, match="at most one LoRA"):
        core.with_and_without(model, "Hello", [lora, lora])


def test_attention_map_is_causal_softmax(model):
    labels, att, fig = core.attention_map(model, "The cat sat on the mat", 1, 2)
    T = len(labels)
    assert att.shape == (T, T) and abs(att.sum(-1) - 1).max() < 1e-5
    assert abs(att[~__import__("numpy").tri(T, dtype=bool)]).max() == 0
    with torch.no_grad():
        ids = core.encode_prompt(model, "The cat sat on the mat")
        ref = model(ids, output_attentions=True).attentions[1][0, 2]
    assert abs(ref.numpy() - att).max() < 1e-6
    # the heatmap is the tour's step 2 function's, for this layer and head
    tour_fig = tour.attention_figure(model, ids, 1, [2], title=fig.get_suptitle())
    assert _figure_data(fig) == _figure_data(tour_fig)
    assert _figure_data(fig) != _figure_data(core.attention_map(model, "The cat sat on the mat", 1, 1)[2])
    assert fig.axes[0].get_title() == "head 2" and fig.axes[0].get_xlabel() == "key token (attended to)"
    with pytest.raises(core.PlaygroundError, match="does not exist"):
        core.attention_map(model, "The cat", 5, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _page_y(page, selector: str, edge: str) -> float:
    """Where an element's top or bottom edge lies on the whole page, in CSS pixels."""
    return page.evaluate("([s, e]) => { const r = document.querySelector(s).getBoundingClientRect();"
                         " return (e === 'top' ? r.top : r.bottom) + window.scrollY; }", [selector, edge])


def _shot(page, folder: Path, name: str, start: str | None = None, end: str | None = None) -> None:
    """A screenshot of the whole page into the test's folder; with $PLAYGROUND_SHOTS set, a copy for the docs cut
    to the part from `start`'s top to `end`'s bottom (selectors) and reduced to 256 colours (small PNGs)."""
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("PLAYGROUND_SHOTS"):
        from PIL import Image                           # matplotlib's own dependency
        img = Image.open(path).convert("RGB")
        top = max(0, int(_page_y(page, start, "top")) - 12) if start else 0
        bottom = min(img.height, int(_page_y(page, end, "bottom")) + 12) if end else img.height
        img.crop((0, top, img.width, bottom)).quantize(256).save(
            Path(os.environ["PLAYGROUND_SHOTS"]) / f"playground_{name}.png", optimize=True)


def _set_number(page, elem: str, value) -> None:
    """A slider's (or number's) value typed into its number box, then Enter."""
    box = page.locator(f"#{elem} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _generate(page, prompt: str, seed: int) -> None:
    page.locator("#prompt textarea").fill(prompt)
    page.locator("#seed input").fill(str(seed))
    page.locator("#seed input").press("Enter")
    page.locator("#generate").click()


# .ci/run sets MINIGPT_REQUIRE_BROWSER=1: there a missing chromium is a failure, never a skip.
REQUIRE_BROWSER = os.environ.get("MINIGPT_REQUIRE_BROWSER") == "1"


@pytest.mark.skipif(not Path(CHROMIUM).exists() and not REQUIRE_BROWSER,
                    reason="Debian's chromium is not installed (apt-get install chromium)")
def test_page_in_browser(tmp_path):
    """The page on the bundled model, driven in headless chromium: generate (and an empty prompt), steer at two
    strengths, an adapter switched on and off, a folder that is not an adapter, attention, and two pages at
    once with different settings. Every text is checked against the plain functions run here."""
    assert Path(CHROMIUM).exists(), f"MINIGPT_REQUIRE_BROWSER=1 but {CHROMIUM} is missing: apt-get install chromium"
    if REQUIRE_BROWSER:
        import playwright.sync_api as sync_api
    else:
        sync_api = pytest.importorskip("playwright.sync_api")
    expect = sync_api.expect
    tiny = GPT.from_pretrained("tiny").eval()
    lora_dir = _lora_dir(tiny, tmp_path / "runs" / "tiny-lora")
    expected = {seed: list(core.stream_text(tiny, prompt, max_new_tokens=30, seed=seed))[-1]
                for prompt, seed in (("Once upon a time", 1), ("The ship sailed", 2))}
    expected_long = list(core.stream_text(tiny, "Once upon a time", max_new_tokens=100, seed=1))[-1]
    expected_long2 = list(core.stream_text(tiny, "The ship sailed", max_new_tokens=100, seed=2))[-1]
    tok = get_tokenizer()
    base, adapted = core.with_and_without(tiny, "The king looked at the crowd and said",
                                          [core.load_adapter_dir(tiny, str(lora_dir))], seed=0, max_new_tokens=20)
    assert base != adapted
    head_dir = _head_dir(tiny.config.n_embd, tmp_path / "runs" / "head", scale=1.0)   # random: no meaning
    jam = core.jam_compare(tiny, "The king looked at the crowd and said", str(head_dir), margin=2.0,
                           max_new_tokens=20, seed=0)
    assert jam.steered != jam.plain
    # the SST-2 head the server would train at startup, trained here on a few rows so that the server loads it
    sst2, _ = core.sst2_head(tiny, tmp_path / "out" / "heads" / "sst2-tiny", rows=64, dev_rows=32, epochs=5,
                             progress=False)
    pplm_head = core.head_steer_compare(tiny, "The king looked at the crowd and said", sst2, "positive",
                                        stepsize=0.3, num_iterations=2, max_new_tokens=6, seed=0)
    assert pplm_head.steered != pplm_head.plain
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "demos.playground", "--model", "tiny", "--port", str(port),
                             "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "playground: http" in line:
                break
        url = f"http://127.0.0.1:{port}/"
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            for _ in range(60):
                try:
                    page.goto(url)
                    break
                except Exception:
                    time.sleep(0.5)
            # Generate, streamed, then an empty prompt
            _generate(page, "Once upon a time", 1)
            expect(page.locator("#gen-msg")).to_contain_text("done", timeout=30000)
            assert page.locator("#gen-out textarea").input_value() == expected[1]
            expect(page.locator("#dist img").filter(visible=True).first).to_be_visible(timeout=30000)
            _shot(page, tmp_path, "generate", end="#dist")
            page.locator("#prompt textarea").fill("")
            page.locator("#generate").click()
            expect(page.locator("#gen-msg")).to_contain_text("empty", timeout=30000)
            _shot(page, tmp_path, "bad_prompt", end="#dist")
            # Stop during a long run: it ends early (fewer tokens than asked), and the next Generate is served
            _set_number(page, "max-new", 100)
            _generate(page, "Once upon a time", 1)
            for _ in range(300):                         # a few tokens first, so that the stop is seen mid-text
                if len(tok.encode(page.locator("#gen-out textarea").input_value())) >= 8:
                    break
                time.sleep(0.05)
            page.locator("#stop").click()
            expect(page.locator("#gen-msg")).to_contain_text("Stopped", timeout=30000)
            stopped = page.locator("#gen-out textarea").input_value()
            time.sleep(1.5)
            assert page.locator("#gen-out textarea").input_value() == stopped        # no longer growing
            assert 8 <= len(tok.encode(stopped)) < 100 and "done" not in page.locator("#gen-msg").inner_text()
            assert expected_long.startswith(stopped)
            expect(page.get_by_text("Error", exact=True)).to_have_count(0)           # the text is shown, not hidden
            _shot(page, tmp_path, "stop", end="#dist")
            _set_number(page, "max-new", 30)
            _generate(page, "Once upon a time", 1)
            expect(page.locator("#gen-msg")).to_contain_text("done", timeout=30000)
            assert page.locator("#gen-out textarea").input_value() == expected[1]
            # Steer at two strengths: the unsteered text stays, the steered one changes, the plot is drawn
            page.get_by_role("tab", name="Steer (PPLM, JAM)").click()
            page.locator("#steer").click()
            expect(page.locator("#steer-msg")).to_contain_text("bag tokens", timeout=30000)
            plain, steered = page.locator("#plain").inner_text(), page.locator("#steered").inner_text()
            assert plain.strip() and steered.strip() and plain != steered
            page.locator("#stepsize input[type=number]").fill("1.5")
            page.locator("#stepsize input[type=number]").press("Enter")
            page.locator("#steer").click()
            expect(page.locator("#steer-msg")).to_contain_text("(strength 1.5)", timeout=30000)
            assert page.locator("#plain").inner_text() == plain
            assert page.locator("#steered").inner_text() not in (plain, steered)
            assert page.locator("#splot canvas, #splot svg").count() > 0
            _shot(page, tmp_path, "steer", end="#splot")
            # JAM: a head that is not one (message), then the head at margin 2 (the texts of jam_compare here)
            page.locator("#head textarea, #head input").first.fill(str(tmp_path / "out"))
            page.locator("#jam").click()
            expect(page.locator("#jam-msg")).to_contain_text("unknown discriminator", timeout=30000)
            page.locator("#head textarea, #head input").first.fill(str(head_dir))
            page.locator("#jam").click()
            expect(page.locator("#jam-msg")).to_contain_text("JAM margin", timeout=30000)
            assert page.locator("#jam-plain textarea").input_value() == tok.decode(jam.plain)
            assert page.locator("#jam-steered textarea").input_value() == tok.decode(jam.steered)
            expect(page.locator("#jam-plot canvas, #jam-plot svg").first).to_be_visible(timeout=30000)
            page.locator("#jam").scroll_into_view_if_needed()
            _shot(page, tmp_path, "steer_jam", "#jam-intro", "#jam-plot")
            # PPLM with the SST-2 head (the menu's default: the head the server loaded at startup), 6 tokens
            _set_number(page, "smax", 6)
            _set_number(page, "pstep", 0.3)
            _set_number(page, "piters", 2)
            page.locator("#psteer").click()
            expect(page.locator("#psteer-msg")).to_contain_text("PPLM with the head", timeout=60000)
            assert page.locator("#pplm-plain textarea").input_value() == tok.decode(pplm_head.plain)
            assert page.locator("#pplm-steered textarea").input_value() == tok.decode(pplm_head.steered)
            expect(page.locator("#pplm-plot canvas, #pplm-plot svg").first).to_be_visible(timeout=30000)
            page.locator("#psteer").scroll_into_view_if_needed()
            _shot(page, tmp_path, "steer_head", "#pplm-head-intro", "#pplm-plot")
            # Adapters: a folder that is not one, then the LoRA on (differs) and off (the base's text)
            page.get_by_role("tab", name="Adapters").click()
            page.locator("#adapter-path textarea, #adapter-path input").first.fill(str(tmp_path / "out"))
            page.locator("#add-adapter").click()
            expect(page.locator("#adapter-msg")).to_contain_text("not an adapter folder", timeout=30000)
            _shot(page, tmp_path, "bad_adapter")
            page.locator("#scan").click()
            box = page.locator("#adapters-on input[type=checkbox]")
            expect(box).to_have_count(1, timeout=30000)
            box.check()
            page.locator("#compare").click()
            expect(page.locator("#adapter-msg")).to_contain_text("1 adapter(s) on", timeout=30000)
            assert page.locator("#base-out textarea").input_value() == base
            assert page.locator("#adapted-out textarea").input_value() == adapted
            expect(page.locator("#adapter-info")).to_contain_text("parameters")
            _shot(page, tmp_path, "adapters")
            box.uncheck()
            page.locator("#compare").click()
            expect(page.locator("#adapter-msg")).to_contain_text("no adapter switched on", timeout=30000)
            assert page.locator("#adapted-out textarea").input_value() == base
            # Inspect: one head's attention over the prompt
            page.get_by_role("tab", name="Inspect").click()
            page.locator("#inspect").click()
            expect(page.locator("#inspect-msg")).to_contain_text("attends most to", timeout=30000)
            expect(page.locator("#iplot img").filter(visible=True).first).to_be_visible(timeout=30000)
            _shot(page, tmp_path, "inspect")
            # Two pages at once, different prompts and seeds: each gets its own text
            other = browser.new_page(viewport={"width": 1280, "height": 1000})
            other.goto(url)
            page.reload()
            _generate(page, "Once upon a time", 1)
            _generate(other, "The ship sailed", 2)
            for pg in (page, other):
                expect(pg.locator("#gen-msg")).to_contain_text("done", timeout=30000)
            assert page.locator("#gen-out textarea").input_value() == expected[1]
            assert other.locator("#gen-out textarea").input_value() == expected[2]
            _shot(other, tmp_path, "second_page")
            # Stop is per page: Stop pressed on one page leaves the other page's long run to finish
            _set_number(other, "max-new", 100)
            _generate(other, "The ship sailed", 2)
            expect(other.locator("#gen-out textarea")).not_to_have_value(expected[2], timeout=30000)
            page.locator("#stop").click()
            expect(other.locator("#gen-msg")).to_contain_text("done", timeout=60000)
            assert other.locator("#gen-out textarea").input_value() == expected_long2
            browser.close()
    finally:
        proc.terminate()
        proc.wait(10)
