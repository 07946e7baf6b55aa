"""Engine test fixtures: the demo checkpoints (built once if missing) and shared engines.

Every engine made through ``make_llm`` is checked after each test: no request left
and every page back (free, or unreferenced in the prefix cache).
"""
from __future__ import annotations

import os

# Triton kernels run on CPU tensors through Triton's interpreter; it must be on before any
# kernel is defined (tandem.engine.kernels is imported lazily, by these tests and the triton backend).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from tandem.engine import LLM  # noqa: E402

from deploy.demo_models import build_all  # noqa: E402

# The test machine is small and shared: one intra-op thread avoids spin-wait oversubscription
# (measured: 8x32 greedy tokens took 17 s with 2 threads under load, 2.4 s with 1).
torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
_ENGINES: list = []


@pytest.fixture(scope="session")
def demo_models():
    """{'dense': path, 'moe': path}; builds models/ with the same builder as `make demo-models`."""
    paths = build_all(os.path.join(REPO, "models"), log=lambda *_: None)
    return {"dense": paths["tandem-demo-dense"], "moe": paths["tandem-demo-moe"]}


@pytest.fixture(scope="session")
def make_llm():
    def make(path, **kw):
        kw.setdefault("max_total_tokens", 8192)
        kw.setdefault("dtype", "float32")
        kw.setdefault("device", "cpu")
        llm = LLM(path, **kw)
        _ENGINES.append(llm.engine)
        return llm

    return make


@pytest.fixture(scope="module")
def dense_llm(demo_models, make_llm):
    return make_llm(demo_models["dense"])


@pytest.fixture(scope="module")
def moe_llm(demo_models, make_llm):
    return make_llm(demo_models["moe"])


@pytest.fixture(autouse=True)
def _no_page_leaks():
    torch.manual_seed(0)
    yield
    for eng in _ENGINES:
        assert not eng.requests, f"requests left in the engine: {list(eng.requests)}"
        assert not eng.scheduler.running and not eng.scheduler.waiting
        assert eng.num_available_pages == eng.pool.num_pages, "KV pages leaked"
        assert eng.pool.num_free_aux == eng.pool.aux.shape[0], "aux slots leaked"
        assert eng.cache.evictable_pages == eng.cache.num_pages, "cached pages still locked"


@pytest.fixture(scope="session")
def prompts():
    return list(PROMPTS)


PROMPTS = [
    "The GNU General Public License is a free, copyleft license for",
    "def __init__(self, name, value=None):\n    self.name = name\n",
    "import os\nimport sys\n\n",
    "Permission is hereby granted, free of charge, to any person obtaining a copy",
    "class Error(Exception):\n    \"\"\"Base class for",
    "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND",
    "    for i in range(len(items)):\n        if",
    "This program is distributed in the hope that it will be useful, but",
    "return",
    "Copyright (C) 2007 Free Software Foundation, Inc.",
    "    def __repr__(self):\n        return '%s(%r)' % (self.__class__.__name__,",
    "Licensed under the Apache License, Version 2.0 (the \"License\");",
    "with open(path) as f:\n    data = f.read()\n",
    "You should have received a copy of the GNU Lesser General Public License along with",
    "if __name__ == '__main__':\n    main()",
    "Redistribution and use in source and binary forms, with or without modification,",
]
