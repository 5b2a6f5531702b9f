"""The playground (demos/playground): its plain functions on a random-weight GPT-2-shaped model, and the page
in a real browser (headless Debian chromium through Playwright), skipped only where chromium is absent."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import torch

from demos.kits import new_lora_model
from demos.playground import core
from minigpt import GPT, beam_search
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


def test_next_token_table_filters(model):
    rows = core.next_token_table(model, "Hello there", top_k=3, n=10)
    before = [b for _, b, _ in rows]
    assert before == sorted(before, reverse=True)
    assert sum(a > 0 for _, _, a in rows) == 3          # top-k 3 keeps three
    assert abs(sum(a for _, _, a in rows) - 1) < 1e-5


def test_steer_changes_text_same_seed(model):
    s0 = core.steer_compare(model, "Hello there", "space", stepsize=0.0, max_new_tokens=6, seed=1)
    assert s0.plain == s0.steered                        # strength 0 is the unsteered run
    s = core.steer_compare(model, "Hello there", "space", stepsize=5.0, max_new_tokens=6, seed=1)
    assert s.plain == s0.plain and s.steered != s.plain
    assert len(s.attribute) == 6 and all(0 <= a <= 1 for a in s.attribute)


def test_beam_text_is_the_best_beam(model):
    text = core.beam_text(model, "Hello there", max_new_tokens=5, num_beams=3)
    ids = core.encode_prompt(model, "Hello there", 5)
    ref = beam_search(model, ids, max_new_tokens=5, num_beams=3, eos_token_id=50256, pad_token_id=50256)
    from minigpt import get_tokenizer
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
    labels, att = core.attention_map(model, "The cat sat on the mat", 1, 2)
    T = len(labels)
    assert att.shape == (T, T) and abs(att.sum(-1) - 1).max() < 1e-5
    assert abs(att[~__import__("numpy").tri(T, dtype=bool)]).max() == 0
    with torch.no_grad():
        ids = core.encode_prompt(model, "The cat sat on the mat")
        ref = model(ids, output_attentions=True).attentions[1][0, 2]
    assert abs(ref.numpy() - att).max() < 1e-6
    assert core.attention_figure(labels, att, 1, 2).axes
    with pytest.raises(core.PlaygroundError, match="does not exist"):
        core.attention_map(model, "The cat", 5, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (apt-get install chromium)")
def test_page_in_browser(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "demos.playground", "--model", "tiny", "--port", str(port),
                             "--out", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
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
            page.locator("#generate").click()
            out = page.locator("#gen-out textarea")
            sync_api.expect(page.locator("#gen-msg")).to_contain_text("done", timeout=30000)
            first = out.input_value()
            assert first.strip()
            page.screenshot(path=str(tmp_path / "generate.png"), full_page=True)
            page.locator("#prompt textarea").fill("")
            page.locator("#generate").click()
            sync_api.expect(page.locator("#gen-msg")).to_contain_text("empty", timeout=30000)
            page.screenshot(path=str(tmp_path / "bad_input.png"), full_page=True)
            page.get_by_role("tab", name="Steer (PPLM)").click()
            page.locator("#steer").click()
            sync_api.expect(page.locator("#steer-msg")).to_contain_text("bag tokens", timeout=30000)
            plain, steered = page.locator("#plain").inner_text(), page.locator("#steered").inner_text()
            assert plain.strip() and steered.strip() and plain != steered
            page.screenshot(path=str(tmp_path / "steer.png"), full_page=True)
            shutil.copy(tmp_path / "steer.png", ROOT / "docs" / "playground_steer.png") \
                if (ROOT / "docs").is_dir() and "PLAYGROUND_SHOT" in __import__("os").environ else None
            browser.close()
    finally:
        proc.terminate()
        proc.wait(10)
