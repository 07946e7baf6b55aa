"""Every way tandem's services are started names a module and flags that exist.

Part of `make test` (through validate_deploy.py; no root, no image built): for each OCI image's
entrypoint (build-support/images/build.py), each compose service (`image` + `command`) and each
Kubernetes Deployment of both overlays (`image`, `command` where an overlay replaces it, `args`):

- the module `python -m` runs is the service's module in the one table (deploy/services.py);
- `python -m <module> --help` exits 0 and prints that module's usage (run once per module, with
  this checkout's sources: the image runs the same sources, packaged);
- every flag the deploy file passes is one that module's `--help` lists, and the arguments parse
  with the service's own parser (a flag that needs a value has one).

The check that started this: the EPLB image ran `python -m tandem.eplb`, a package without a
`__main__`, after the service moved to `tandem.eplb_planner`; nothing ran the image's entrypoint.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from deploy.services import module_of, service_modules  # noqa: E402

# `python -m module`, `python3 -m module`, `/opt/tandem/venv/bin/python -m module` in an argv
# or inside a `sh -c` script.
_PY_M = re.compile(r"(?:^|[\s/])python[\d.]*\s+-m\s+([\w.]+)")


class EntrypointError(Exception):
    """A start command that would not start the service; the message names the file and why."""


def image_service(image: str) -> str | None:
    """`localhost/tandem/decode:0.1.0-cuda`, `tandem/decode` -> `decode`; None for other images."""
    name = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
    parts = name.split("/")
    if len(parts) >= 2 and parts[-2] == "tandem" and parts[-1] in service_modules():
        return parts[-1]
    return None


def command_modules(command: Iterable[str]) -> list[str]:
    """The modules a container command runs with `python -m` (in argv form or in a shell script)."""
    argv = list(command)
    found = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-m" and Path(argv[i - 1] if i else "").name
             .startswith("python")]
    for a in argv:
        found += _PY_M.findall(a)
    return found


def flags_of(args: Iterable[str]) -> list[str]:
    """`--config x --foo=1 -v` -> [`--config`, `--foo`]."""
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


class HelpTexts:
    """`python -m <module> --help` of each module, run once (with this checkout's sources)."""

    def __init__(self, python: str = sys.executable) -> None:
        self.python = python
        self._texts: dict[str, str] = {}

    def __call__(self, module: str) -> str:
        if module not in self._texts:
            res = subprocess.run([self.python, "-m", module, "--help"], capture_output=True, text=True,
                                 timeout=300, cwd=REPO)
            if res.returncode != 0:
                raise EntrypointError(f"`python -m {module} --help` exited {res.returncode}:\n"
                                      f"{res.stdout[-2000:]}{res.stderr[-2000:]}")
            if f"usage: python -m {module} " not in res.stdout:
                raise EntrypointError(f"`python -m {module} --help` does not print {module}'s usage:\n"
                                      f"{res.stdout[:500]}")
            self._texts[module] = res.stdout
        return self._texts[module]


def check_start(origin: str, image: str, command: list[str] | None, args: list[str], help_of: HelpTexts) -> str:
    """One container start: ``image`` (its entrypoint), an optional ``command`` replacing the
    entrypoint, and ``args``. Returns the service it starts; raises EntrypointError."""
    svc = image_service(image)
    if svc is None:
        raise EntrypointError(f"{origin}: image {image!r} is not one of tandem's ({', '.join(service_modules())})")
    module = module_of(svc)
    if command:
        named = command_modules(command)
        if named != [module]:
            raise EntrypointError(f"{origin}: the command {shlex.join(command)!r} runs {named or 'no python -m'}; "
                                  f"the {svc} image's module is {module}")
        if not any('"$@"' in a or a == "$@" for a in command) and args:
            raise EntrypointError(f"{origin}: the command replaces the entrypoint but drops the args {args}")
    text = help_of(module)
    listed = set(re.findall(r"(--[\w-]+)", text))
    unknown = [f for f in flags_of(args) if f not in listed]
    if unknown:
        raise EntrypointError(f"{origin}: `python -m {module}` has no flag {', '.join(unknown)} "
                              f"(see python -m {module} --help)")
    from tandem.config import SERVICE_SCHEMAS, build_parser

    parser = build_parser(SERVICE_SCHEMAS[svc], prog=f"python -m {module}")
    try:
        parser.parse_args(args)
    except SystemExit:
        raise EntrypointError(f"{origin}: `python -m {module} {shlex.join(args)}` does not parse") from None
    return svc


def check_images(help_of: HelpTexts) -> list[str]:
    """Every image's entrypoint, as build-support/images/build.py writes it."""
    sys.path.insert(0, str(REPO / "build-support" / "images"))
    import build as images  # noqa: PLC0415

    done = []
    for svc in images.SERVICES:
        ep = images.entrypoint(svc)
        check_start(f"image {svc} (build-support/images/build.py)", f"localhost/tandem/{svc}", ep, [], help_of)
        done.append(f"image:{svc}")
    return done


def check_compose(spec: dict, help_of: HelpTexts, origin: str = "deploy/compose/compose.yaml") -> list[str]:
    done = []
    for name, s in spec["services"].items():
        image = re.sub(r"\$\{[^}:]*:-([^}]*)\}", r"\1", str(s.get("image", "")))  # ${VAR:-default}
        if image_service(image) is None:
            continue  # prometheus
        svc = check_start(f"{origin} service {name}", image, s.get("entrypoint"), list(s.get("command", [])),
                          help_of)
        done.append(f"compose:{svc}")
    return done


def check_k8s(overlay: str, docs: list[dict], help_of: HelpTexts) -> list[str]:
    done = []
    for d in docs:
        if d.get("kind") != "Deployment":
            continue
        for c in d["spec"]["template"]["spec"]["containers"]:
            if image_service(c["image"]) is None:
                continue  # etcd
            svc = check_start(f"k8s {overlay} Deployment {d['metadata']['name']} container {c['name']}",
                              c["image"], c.get("command"), list(c.get("args", [])), help_of)
            done.append(f"k8s-{overlay}:{svc}")
    return done
