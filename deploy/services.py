"""The services tandem ships and the module `python -m` runs for each.

The table itself is ``TANDEM_SERVICES`` in build-support/pants-macros/tandem_service.py, where
the Pants targets read it (a Pants macro cannot import Python modules); this module reads the
same literal for everything else: the OCI images' entrypoints, `make deploy-local`, the PEX and
image smoke tests, and the check that every deploy file starts a module that exists.
"""
from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

MACRO = Path(__file__).resolve().parents[1] / "build-support" / "pants-macros" / "tandem_service.py"


@cache
def service_modules() -> dict[str, str]:
    """{service name: module}, in the table's order (router, prefill, decode, eplb)."""
    tree = ast.parse(MACRO.read_text(), str(MACRO))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "TANDEM_SERVICES"
                                                for t in node.targets):
            pairs = ast.literal_eval(node.value)
            if not (isinstance(pairs, tuple) and pairs and all(
                    isinstance(p, tuple) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs)):
                raise ValueError(f"{MACRO}: TANDEM_SERVICES must be a non-empty tuple of (service, module) pairs")
            table = dict(pairs)
            if len(table) != len(pairs):
                raise ValueError(f"{MACRO}: TANDEM_SERVICES names a service twice")
            return table
    raise ValueError(f"{MACRO}: no TANDEM_SERVICES table")


def module_of(service: str) -> str:
    """The module `python -m` runs for ``service``; ValueError naming the known services."""
    modules = service_modules()
    if service not in modules:
        raise ValueError(f"unknown service {service!r}; tandem's services are {', '.join(modules)}")
    return modules[service]


def service_of_module(module: str) -> str:
    """The inverse of ``module_of``."""
    for service, m in service_modules().items():
        if m == module:
            return service
    raise ValueError(f"no tandem service runs module {module!r}; the modules are "
                     f"{', '.join(service_modules().values())}")
