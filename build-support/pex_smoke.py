"""Run the four Pants-built PEX files as a user would: each alone, outside the repo, in an empty
environment. `--help` first, then the whole disaggregated stack on loopback:

    prefill PEX  (dense demo model, --disaggregation-transfer-backend nixl)
    decode PEX   (--disaggregation-mode decode, nixl, --max-local-prefill-length 0: every prompt
                  is prefilled remotely, so its KV pages cross NIXL inside the PEXes)
    router PEX   (static discovery of the decode worker)
    eplb PEX     (planner, MoE demo model)

Every one must reach gRPC health SERVING and /health 200; one chat completion goes through the
router; prefill must have computed that prompt (its sglang:prompt_tokens_total grows by the prompt
length) and registered decode with the nixl backend. Everything is stopped with SIGTERM, and must
exit 0. Used by build-support/pants-smoke.sh (`make test`).

    python build-support/pex_smoke.py DIST_DIR MODELS_DIR
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stack_checks as sc  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deploy.services import module_of, service_modules  # noqa: E402

SERVICES = tuple(service_modules())
WORKER_FLAGS = ["--page-size", "16", "--max-total-tokens", "4096", "--chunked-prefill-size", "256",
                "--torch-num-threads", "1", "--host", "127.0.0.1"]


def log(msg: str) -> None:
    print(f"[pex-smoke] {msg}", flush=True)


def main(dist: Path, models: Path) -> None:
    t0 = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="tandem-pex-smoke-"))
    # An empty environment: only PATH, a throw-away HOME, and a PEX_ROOT that persists between
    # runs (PEXes unpack there once per content hash; sharing it is safe).
    pex_root = Path(os.environ.get("TANDEM_PEX_ROOT", Path.home() / ".cache" / "tandem-pants" / "pex_root"))
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(scratch), "PEX_ROOT": str(pex_root),
           "PYTHONUNBUFFERED": "1"}
    pex = {s: dist / f"tandem-{s}.pex" for s in SERVICES}
    for s, p in pex.items():
        if not os.access(p, os.X_OK):
            raise SystemExit(f"FAIL: {p} was not built")
        out = subprocess.run([str(p), "--help"], cwd=scratch, env=env, capture_output=True, text=True, timeout=600)
        if out.returncode != 0 or f"usage: python -m {module_of(s)} " not in out.stdout:
            raise SystemExit(f"FAIL: {p} --help exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    log(f"--help ok for {', '.join(SERVICES)} ({time.monotonic() - t0:.0f} s, PEX_ROOT {pex_root})")

    dense, moe = str(models / "tandem-demo-dense"), str(models / "tandem-demo-moe")
    ports = dict(zip(["prefill", "prefill_sys", "decode", "decode_sys", "router", "router_sys", "router_http",
                      "eplb", "eplb_sys"], sc.free_ports(9)))
    addr = {k: f"127.0.0.1:{v}" for k, v in ports.items()}
    argv = {
        "prefill": ["--model-path", dense, *WORKER_FLAGS, "--disaggregation-transfer-backend", "nixl"],
        "decode": ["--model-path", dense, *WORKER_FLAGS, "--disaggregation-mode", "decode",
                   "--disaggregation-transfer-backend", "nixl", "--prefill-addresses", addr["prefill"],
                   "--max-local-prefill-length", "0"],
        "router": ["--model-path", dense, "--host", "127.0.0.1", "--workers", addr["decode"],
                   "--http-port", str(ports["router_http"])],
        "eplb": ["--model-path", moe, "--host", "127.0.0.1"],
    }
    procs: dict[str, subprocess.Popen] = {}
    logs = {s: scratch / f"{s}.log" for s in SERVICES}

    def tails() -> str:
        return "".join(f"\n--- {s} log (tail) ---\n{logs[s].read_text(errors='replace')[-3000:]}"
                       for s in procs if logs[s].exists())

    try:
        # All at once: decode's warmup retries until prefill serves; the router health-checks decode.
        for s in ("prefill", "eplb", "decode", "router"):
            with open(logs[s], "w") as fh:
                procs[s] = subprocess.Popen([str(pex[s]), "--port", str(ports[s]),
                                             "--system-port", str(ports[f"{s}_sys"]), *argv[s]],
                                            cwd=scratch, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        def exited():
            dead = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
            return f"exited: {dead}" if dead else None

        for s in ("prefill", "eplb", "decode", "router"):
            sc.wait_serving(s, addr[s], addr[f"{s}_sys"], timeout=300, on_timeout=tails, alive=exited)
        log(f"all four SERVING (gRPC health + /health) after {time.monotonic() - t0:.0f} s")

        before = sc.metric_sum(sc.metrics(addr["prefill_sys"]), "sglang:prompt_tokens_total")
        out = sc.chat_when_routable(addr["router_http"], "tandem-demo-dense", "Say hello to the PEX files.",
                                    max_tokens=8)
        after = sc.wait_until(
            "prefill's sglang:prompt_tokens_total counting the request",
            lambda: (v := sc.metric_sum(sc.metrics(addr["prefill_sys"]), "sglang:prompt_tokens_total"))
            >= before + out["usage"]["prompt_tokens"] and v, 30)
        if "backend nixl" not in logs["prefill"].read_text():
            raise SystemExit("FAIL: prefill did not register decode with the nixl backend" + tails())
        log(f"chat through router -> decode -> prefill (nixl, remote prefill forced): "
            f"{out['usage']['prompt_tokens']} prompt tokens prefilled remotely (prefill counter "
            f"{before:.0f} -> {after:.0f}), {out['usage']['completion_tokens']} tokens: "
            f"{out['choices'][0]['message']['content']!r}")
    except BaseException:
        print(tails(), file=sys.stderr)
        raise
    finally:
        codes = {}
        for s in ("router", "decode", "prefill", "eplb"):
            p = procs.get(s)
            if p is None:
                continue
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
            try:
                codes[s] = p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                codes[s] = p.wait(10)
    bad = {s: c for s, c in codes.items() if c != 0}
    if bad:
        raise SystemExit(f"FAIL: not a clean SIGTERM exit: {bad}" + tails())
    log(f"ok: four PEX files served a disaggregated nixl request and stopped cleanly; "
        f"{time.monotonic() - t0:.0f} s")
    subprocess.run(["rm", "-rf", str(scratch)], check=False)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.strip().splitlines()[-1].strip())
    main(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve())
