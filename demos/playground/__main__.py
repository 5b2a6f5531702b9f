"""python -m demos.playground [--model tiny | --weights DIR] [--port N] [--host H] [--share] [--runs DIR] [--smoke]"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from ..common import add_demo_args, choose_model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m demos.playground",
                                description=("A local page: generate, steer with PPLM, switch adapters on and off, "
                                             "inspect attention."))
    add_demo_args(p, out="runs/playground", quick=False, trains=False)
    p.add_argument("--port", type=int, default=7860, help="port on the host (default: 7860)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 exposes it, with a warning)")
    p.add_argument("--runs", default="runs",
                   help="folder searched for adapters (peft format) for the Adapters tab (default: runs)")
    p.add_argument("--head-rows", type=int, default=1000, metavar="N",
                   help="SST-2 rows the Steer tab's sentiment head is trained on at the first start (saved under "
                        "--out/heads and loaded at the next one; 0: no head trained, default: 1000)")
    p.add_argument("--share", action="store_true", help="a public gradio link (printed with a warning)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # gradio's cache (uploaded and served files) goes under --out: nothing is written outside it
    os.environ["GRADIO_TEMP_DIR"] = str(Path(args.out).resolve() / "gradio-cache")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")     # offline: no usage report to gradio's servers
    try:
        from .app import build_app
    except ImportError as e:
        print(f"error: the playground needs gradio ({e}): pip install -e '.[app]'", file=sys.stderr)
        return 2
    if args.head_rows < 0:
        print(f"error: --head-rows must be >= 0, got {args.head_rows}", file=sys.stderr)
        return 2
    from . import core
    chosen = choose_model(args)
    print(chosen.reason)
    trained = None
    if args.head_rows:
        rows = min(args.head_rows, 32) if args.smoke else args.head_rows       # smoke: seconds, not a real head
        trained, line = core.sst2_head(chosen.model, Path(args.out) / "heads" / f"sst2-{Path(chosen.name).name}",
                                       rows=rows, dev_rows=min(rows, 300), seed=args.seed)
        print(line)
    demo = build_app(chosen.model, chosen.reason, args.runs, core.head_choices(chosen.model, trained))
    if args.smoke:
        print("smoke: the page was built; not serving")
        return 0
    if args.host != "127.0.0.1" or args.share:
        print(f"warning: the playground is reachable beyond this machine (host {args.host}, share {args.share})",
              file=sys.stderr)
    print(f"playground: http://{args.host}:{args.port}/")
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
