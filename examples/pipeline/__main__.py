"""``python -m examples.pipeline serve|load|demo``: the ingest tier, the load generator, the demo.

Run from the repository's root. Every flag also reads the environment variable
shown in ``--help``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from examples.pipeline import loops
    from examples.pipeline.ingest import SWITCH_INTERVAL, create_app
    from examples.pipeline.store import data_dir, display, open_store

    if not os.environ.get("PIPELINE_STORE"):
        data_dir().mkdir(parents=True, exist_ok=True)
    store = open_store()
    coordinator = None if args.no_wake else loops.coordinator_url()
    web = create_app(store, coordinator, loops.app.name, loops.PARTITIONS)
    sys.setswitchinterval(SWITCH_INTERVAL)
    print(f"pipeline ingest on http://{args.host}:{args.port}/ storing in {display(store.url)}"
          + ("" if coordinator is None else f", waking {display(coordinator)}"), flush=True)
    # No proxy-headers middleware around every request (it listens on its own address, not
    # behind a proxy) and no Server header.
    uvicorn.run(web, host=args.host, port=args.port, log_level="warning", access_log=False,
                timeout_keep_alive=30, backlog=4096, proxy_headers=False, server_header=False)
    return 0


def _load(args: argparse.Namespace) -> int:
    from examples.pipeline.load import run

    async def main() -> dict[str, object]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await run(args.url, args.rate, args.seconds, apps=args.apps,
                         connections=args.connections, seed=args.seed, stop=stop)

    with asyncio.Runner(loop_factory=fast_loop()) as runner:
        print(json.dumps(runner.run(main())), flush=True)
    return 0


def fast_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (the ``dashboard`` extra), else asyncio's:
    the load generator shares the CPUs with the server it measures, so it should cost little.
    (uvicorn picks uvloop for the ingest tier by itself.)"""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _demo(args: argparse.Namespace) -> int:
    from examples.pipeline.demo import main

    return main(args)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m examples.pipeline",
                                  description="The metrics ingestion pipeline of the ostinato examples.")
    commands = top.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="the ingest tier (POST /v1/metrics, the page)")
    serve.add_argument("--host", default=os.environ.get("PIPELINE_HOST", "127.0.0.1"),
                       help="address to listen on ($PIPELINE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=int(os.environ.get("PIPELINE_PORT", "8000")),
                       help="port ($PIPELINE_PORT, default 8000)")
    serve.add_argument("--no-wake", action="store_true",
                       help="send the aggregator no wake-ups (it finds work after its idle backoff)")
    serve.set_defaults(run=_serve)

    load = commands.add_parser("load", help="post bundles at a steady rate and print a JSON summary")
    load.add_argument("--url", default=os.environ.get("PIPELINE_URL", "http://127.0.0.1:8000"),
                      help="the ingest tier ($PIPELINE_URL)")
    load.add_argument("--rate", type=float, default=1000.0, help="bundles a second (default 1000)")
    load.add_argument("--seconds", type=float, default=10.0,
                      help="how long (default 10; 0: until Ctrl-C or SIGTERM)")
    load.add_argument("--apps", type=int, default=20, help="how many applications send (default 20)")
    load.add_argument("--connections", type=int, default=256, help="most connections open at once")
    load.add_argument("--seed", type=int, default=None, help="seed of the random bundles")
    load.set_defaults(run=_load)

    demo = commands.add_parser("demo", help="make demo: ingest, two runners, load, a kill -9, the page")
    demo.add_argument("--forever", action="store_true", help="run until Ctrl-C instead of a minute")
    demo.add_argument("--seconds", type=float, default=60.0, help="how long the load runs (default 60)")
    demo.add_argument("--rate", type=float, default=1000.0, help="bundles a second (default 1000)")
    demo.add_argument("--port", type=int, default=int(os.environ.get("PIPELINE_PORT", "8000")),
                      help="port of the ingest tier and its page ($PIPELINE_PORT, default 8000; 0: any)")
    demo.add_argument("--kill-after", type=float, default=None,
                      help="seconds into the load to kill the aggregator's holder (default: a third)")
    demo.set_defaults(run=_demo)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
