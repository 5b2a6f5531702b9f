"""The playground's speed as a learner sees it: the time to the first token and the tokens per second of a streamed
generation in the page (through the running server, by gradio's own client: HTTP + server-sent events, the path
the browser uses), against the same greedy generation by the library (minigpt.stream, in this process) and by the
command line (`python -m minigpt generate`, a fresh process: its start-up is in its time to first token).

    python benchmarks/bench_playground.py [--model tiny] [--tokens 48] [--repeats 3] [--threads 1]

The sides are measured in turns (page, library, command line, then the other way round), so a busy neighbour on
the machine slows each alike. Tokens per second is the decoding rate after the first token: (N - 1) / (t_last -
t_first). The printed table has each side's ratio to the library call. Greedy decoding: the three texts must be the
same, and the benchmark checks it.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minigpt import EOT_ID, GPT, get_tokenizer, stream  # noqa: E402

PROMPT = "Once upon a time"


def child_env() -> dict:
    """The server's and the command line's environment: this checkout, and as many torch threads as here."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "demos.playground", "--model", model, "--port", str(port),
                             "--out", str(out), "--head-rows", "0"],     # no SST-2 head: the page only generates
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
    for line in proc.stdout:
        if "playground: http" in line:
            return proc
    raise RuntimeError(f"the playground did not start (exit code {proc.wait()})")


def connect(Client, url: str, seconds: float = 120.0):
    """gradio's client, once the server listens (the URL is printed just before it does)."""
    t = time.perf_counter()
    while True:
        try:
            return Client(url, verbose=False)
        except Exception:                                   # httpx.ConnectError until the port is open
            if time.perf_counter() - t > seconds:
                raise
            time.sleep(0.5)


def page_side(client, n: int) -> tuple[float, float, str]:
    """(seconds to the first streamed text, seconds from it to the last token, the text), through the server."""
    args = (PROMPT, "greedy", n, 1.0, 0, 1.0, 0, 1.0, 0, "", 4, 1.0)
    t0 = time.perf_counter()
    job = client.submit(*args, api_name="/generate")
    first = last = None
    text = ""
    for out in job:
        if out[0] and first is None:
            first = time.perf_counter()
        if out[0]:
            text, last = out[0], time.perf_counter()
    if first is None:
        raise RuntimeError(f"the page streamed no text: {job.outputs()[-1] if job.outputs() else 'no output'}")
    return first - t0, last - first, text


def library_side(model: GPT, n: int) -> tuple[float, float, str]:
    tok = get_tokenizer()
    ids = torch.tensor([tok.encode(PROMPT)])
    t0 = time.perf_counter()
    first, new = None, []
    for t in stream(model, ids, max_new_tokens=n, do_sample=False, eos_token_id=EOT_ID):
        if first is None:
            first = time.perf_counter()
        if int(t[0]) == EOT_ID:
            break
        new.append(int(t[0]))
    return first - t0, time.perf_counter() - first, tok.decode(new)


def cli_side(model: str, n: int) -> tuple[float, float, str]:
    """A fresh `python -m minigpt generate` process, read unbuffered: it echoes the prompt, then each token."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "minigpt", "generate", "--model", model, "--greedy",
                             "--stop-at-eos", "--max-new-tokens", str(n), PROMPT], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, bufsize=0, env=child_env())
    out, first, last = b"", None, None
    while chunk := os.read(proc.stdout.fileno(), 4096):
        out += chunk
        if len(out.rstrip(b"\n")) > len(PROMPT.encode()):
            first = first or time.perf_counter()
            last = time.perf_counter()
    proc.wait()
    if first is None:
        raise RuntimeError(f"python -m minigpt generate printed no token (exit code {proc.returncode})")
    return first - t0, last - first, out.decode()[len(PROMPT):].rstrip("\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="the model the three sides load (default: tiny, the bundled one)")
    p.add_argument("--tokens", type=int, default=48, help="new tokens per generation (default: 48)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side, after one warm-up (default: 3)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads on every side (default: 1; on a shared, loaded machine more threads than free "
                        "cores make every side crawl)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        from gradio_client import Client
    except ImportError as e:
        print(f"error: the page side needs gradio's client ({e}): pip install -e '.[app]'", file=sys.stderr)
        return 2
    model = GPT.from_pretrained(args.model).eval()
    n = args.tokens
    print(f"model: {args.model} ({model.num_parameters():,} parameters), {n} new tokens, greedy, prompt {PROMPT!r}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = start_server(args.model, port, Path(tmp) / "out")
        try:
            client = connect(Client, f"http://127.0.0.1:{port}/")
            sides = {"page (gradio server, streamed)": lambda: page_side(client, n),
                     "library (minigpt.stream)": lambda: library_side(model, n),
                     "command line (python -m minigpt generate)": lambda: cli_side(args.model, n)}
            for fn in sides.values():
                fn()                                                  # warm-up (the first page request, caches)
            got: dict[str, list] = {k: [] for k in sides}
            for r in range(args.repeats):
                order = list(sides) if r % 2 == 0 else list(reversed(sides))
                for k in order:
                    got[k].append(sides[k]())
        finally:
            server.terminate()
            server.wait(10)
    texts = {k: v[-1][2] for k, v in got.items()}
    same = len(set(t.strip() for t in texts.values())) == 1
    print(f"the three texts are {'the same' if same else 'NOT the same'}: {texts['library (minigpt.stream)']!r}")
    if not same:
        for k, t in texts.items():
            print(f"  {k}: {t!r}")
    ttft = {k: statistics.median(x[0] for x in v) for k, v in got.items()}
    rate = {k: statistics.median((n - 1) / x[1] for x in v) for k, v in got.items()}
    lib = "library (minigpt.stream)"
    print(f"\n{'side':44s} {'first token (ms)':>16s} {'x library':>9s} {'tokens/s':>9s} {'x library':>9s}")
    for k in sides:
        print(f"{k:44s} {1000 * ttft[k]:16.1f} {ttft[k] / ttft[lib]:9.2f} {rate[k]:9.1f} {rate[k] / rate[lib]:9.2f}")
    print(f"(medians of {args.repeats} runs per side, measured in turns; first token: from the request (page), "
          "the call (library) or the process start (command line: imports and model load included); tokens/s: "
          "(N - 1) / time from the first token to the last)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
