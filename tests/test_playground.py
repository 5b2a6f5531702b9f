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

from demos.playground import core
from minigpt import GPT
from tests.helpers import TINY, make_hf_model

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
