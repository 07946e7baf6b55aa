"""`make deploy-local`: run the whole tandem stack on loopback until Ctrl-C.

    python -m deploy.local.run [--stack deploy/local/stack.yaml] [--no-prometheus]
    python -m deploy.local.run --stop        # what `make stop-local` runs
"""
from __future__ import annotations

import argparse
import signal
import sys
import time

from deploy.local.stack import (
    DEFAULT_RUN_DIR,
    DEFAULT_STACK,
    PrometheusMissing,
    Stack,
    load_stack_config,
    stop_from_pidfile,
)


class Progress:
    """One line per process, redrawn in place on a terminal, appended otherwise."""

    SYMBOL = {"starting": "…", "healthy": "✓"}

    def __init__(self, names: list[str]) -> None:
        self.state = dict.fromkeys(names, "waiting")
        self.t0 = time.monotonic()
        self.tty = sys.stdout.isatty()
        self.drawn = False

    def __call__(self, name: str, state: str) -> None:
        self.state[name] = state
        elapsed = time.monotonic() - self.t0
        if not self.tty:
            print(f"[{elapsed:5.1f}s] {name}: {state}", flush=True)
            return
        if self.drawn:
            sys.stdout.write(f"\x1b[{len(self.state) + 1}A")
        done = sum(s == "healthy" for s in self.state.values())
        bar = "#" * int(30 * done / len(self.state))
        sys.stdout.write(f"\x1b[2K[{bar:<30}] {done}/{len(self.state)} healthy  {elapsed:5.1f}s\n")
        for n, s in self.state.items():
            sys.stdout.write(f"\x1b[2K  {self.SYMBOL.get(s, ' ')} {n:<12} {s}\n")
        sys.stdout.flush()
        self.drawn = True


def banner(stack: Stack) -> str:
    cfg = stack.cfg
    url = stack.openai_url
    model = cfg["model_path"].rstrip("/").rsplit("/", 1)[-1]
    lines = ["", f"tandem is up ({cfg['mode']}, model {model}); logs in {stack.logs_dir}", "",
             f"  OpenAI endpoint   {url}"]
    for s in stack.specs:
        lines.append(f"  {s.name:<17} grpc {s.grpc}   metrics {stack.scheme}://{s.system}/metrics")
    decode = next(s for s in stack.specs if s.kind == "decode")
    for item in decode.config.get("lora_paths", []):  # LORA=1
        lines.append(f"  LoRA adapter      model {model}:{item.partition('=')[0]}")
    if stack.prometheus:
        lines.append(f"  Prometheus        {stack.prometheus_url}")
    else:
        lines.append("  Prometheus        not started (--no-prometheus)")
    curl_tls, py_import, py_client = "", "", ""
    if stack.client_tls:
        t = stack.client_tls
        lines.append(f"  mTLS              every port; CA {t['ssl_ca_certs']}, client certificate {t['ssl_certfile']}")
        curl_tls = f"--cacert {t['ssl_ca_certs']} --cert {t['ssl_certfile']} --key {t['ssl_keyfile']} "
        py_import = "import httpx; "
        py_client = (f", http_client=httpx.Client(verify='{t['ssl_ca_certs']}', "
                     f"cert=('{t['ssl_certfile']}', '{t['ssl_keyfile']}'))")
    embed = cfg["model_path"] if cfg.get("embedding") else cfg.get("embedding_model_path")
    if embed:
        name = embed.rstrip("/").rsplit("/", 1)[-1]
        lines += ["", "Embeddings (--is-embedding workers):",
                  f"  curl -s {curl_tls}{url}/embeddings -H 'Content-Type: application/json' \\",
                  f"    -d '{{\"model\": \"{name}\", \"input\": [\"Hello!\", \"Bonjour\"]}}'"]
        if cfg.get("embedding"):  # an embedding-only stack generates nothing
            lines += ["", "Ctrl-C (or `make stop-local` from another shell) stops everything."]
            return "\n".join(lines)
    lines += [
        "", "Try it:",
        f"  curl -s {curl_tls}{url}/chat/completions -H 'Content-Type: application/json' \\",
        f"    -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}], "
        "\"max_tokens\": 32}'",
        "",
        f"  .venv/bin/python -c \"{py_import}from openai import OpenAI; "
        f"c = OpenAI(base_url='{url}', api_key='none'{py_client}); "
        f"print(c.completions.create(model='{model}', prompt='The meaning of', max_tokens=24).choices[0].text)\"",
        "", "Ctrl-C (or `make stop-local` from another shell) stops everything.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.local.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stack", default=str(DEFAULT_STACK), help="stack description (YAML)")
    p.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR), help="configs, logs and pids go here")
    p.add_argument("--no-prometheus", action="store_true", help="do not start Prometheus")
    p.add_argument("--stop", action="store_true", help="stop a running stack and exit")
    p.add_argument("--exit-when-ready", action="store_true", help="start, print the banner, stop (smoke test)")
    args = p.parse_args(argv)
    if args.stop:
        stopped = stop_from_pidfile(args.run_dir)
        print(f"stopped: {', '.join(stopped)}" if stopped else "no running stack found")
        return 0
    try:
        cfg = load_stack_config(args.stack)
    except ValueError as exc:
        print(f"deploy-local: {exc}", file=sys.stderr)
        return 2
    try:
        stack = Stack(cfg, args.run_dir, with_prometheus=not args.no_prometheus)
    except PrometheusMissing as exc:
        print(f"deploy-local: {exc}", file=sys.stderr)
        return 2
    t0 = time.monotonic()

    def on_signal(signum, _frame):
        raise KeyboardInterrupt

    # SIGINT too: a process started in the background by a non-interactive shell inherits
    # SIGINT as ignored, and Python then leaves it ignored (Ctrl-C / `kill -INT` would not stop
    # the stack; seen in `make test-fresh` runs started with `&`).
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        stack.start(Progress(stack.process_names))
        print(f"\nall healthy in {time.monotonic() - t0:.1f}s")
        print(banner(stack), flush=True)
        if args.exit_when_ready:
            return 0
        while True:
            dead = [n for n, ok in stack.alive().items() if not ok]
            if dead:
                print(f"deploy-local: {', '.join(dead)} exited; see {stack.logs_dir}. Stopping.", file=sys.stderr)
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM, or `make stop-local` (which signals this process)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second Ctrl-C must not break the stop itself
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("\nstopping…", flush=True)
        stack.stop()
        print("stopped", flush=True)
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"deploy-local: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
