"""Adapters known to the engine, in host memory and in device slots.

Three levels, as in S-LoRA and SGLang: *registered* (a name and a path: ``--lora-paths``,
``load``/``unload`` while serving), *loaded* into host memory (at most ``--max-loaded-loras``,
least recently used dropped and read again from disk when next needed) and *in a slot* of the
device buffers (``--max-loras-per-batch``). A running request pins its adapter's slot until it
finishes or is retracted; the scheduler admits a request only when its adapter has a slot
(``acquire``), so the running batch never mixes more adapters than there are slots.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from .adapter import LoraAdapter, LoraAdapterError, load_adapter
from .weights import LoraWeights


class UnknownLoraError(LookupError):
    """A request or command names an adapter that is not registered."""

    def __init__(self, name: str):
        super().__init__(f"LoRA adapter {name!r} is not loaded")
        self.name = name


class LoraExistsError(LoraAdapterError):
    """``load`` of a name that is already registered."""


class LoraInUseError(LoraAdapterError):
    """``unload`` of an adapter that running or waiting requests use."""


@dataclass
class LoraCounters:
    requests: dict = field(default_factory=dict)  # adapter -> requests admitted
    slot_loads: int = 0  # adapters written into a device slot
    disk_loads: int = 0  # adapters read from disk into host memory


class LoraManager:
    def __init__(self, weights: LoraWeights, num_layers: int, max_loaded: int, paths: dict | None = None):
        self.weights, self.num_layers = weights, num_layers
        self.max_rank, self.num_slots, self.max_loaded = weights.max_rank, weights.num_slots, max_loaded
        self.paths: dict[str, str] = {}
        self.loaded: OrderedDict[str, LoraAdapter] = OrderedDict()  # host memory, least recent first
        self.slot_name: list[str | None] = [None] * self.num_slots
        self.slot_users = [0] * self.num_slots
        self.slot_tick = [0] * self.num_slots
        self._tick = 0
        self.counters = LoraCounters()
        for name, path in (paths or {}).items():
            self.load(name, path)

    # ---- registry (--lora-paths, LoadLora / UnloadLora / ListLoras) -------------------------------
    def names(self) -> list[str]:
        return sorted(self.paths)

    def has(self, name: str) -> bool:
        return name in self.paths

    def load(self, name: str, path: str) -> LoraAdapter:
        """Register ``name`` -> ``path`` (read and checked now: a bad adapter fails here)."""
        if not name or ":" in name:
            raise LoraAdapterError(f"lora name {name!r}: must be non-empty and without ':'")
        if name in self.paths:
            raise LoraExistsError(f"LoRA adapter {name!r} is already loaded (from {self.paths[name]!r})")
        adapter = load_adapter(name, path, self.max_rank, self.num_layers)
        self.weights.check(adapter)
        self.paths[name] = path
        self._keep(adapter)
        return adapter

    def unload(self, name: str) -> None:
        """Forget ``name``; refused while a request uses it."""
        if name not in self.paths:
            raise UnknownLoraError(name)
        if name in self.slot_name:
            slot = self.slot_name.index(name)
            if self.slot_users[slot]:
                raise LoraInUseError(f"LoRA adapter {name!r} is in use by {self.slot_users[slot]} request(s)")
            self.slot_name[slot] = None
            self.weights.write(slot, None)
        del self.paths[name]
        self.loaded.pop(name, None)

    # ---- host memory ------------------------------------------------------------------------------
    def _keep(self, adapter: LoraAdapter) -> None:
        self.loaded[adapter.name] = adapter
        self.loaded.move_to_end(adapter.name)
        while len(self.loaded) > self.max_loaded:
            self.loaded.popitem(last=False)

    def _adapter(self, name: str) -> LoraAdapter:
        adapter = self.loaded.get(name)
        if adapter is None:
            adapter = load_adapter(name, self.paths[name], self.max_rank, self.num_layers)
            self.counters.disk_loads += 1
        self._keep(adapter)
        return adapter

    # ---- device slots -----------------------------------------------------------------------------
    def slot_of(self, name: str) -> int | None:
        return self.slot_name.index(name) if name in self.slot_name else None

    def acquire(self, name: str) -> int | None:
        """The slot holding ``name``, pinned for one more request; it is written there first if
        needed (into a free slot, else the least recently used unpinned one). None when every
        slot is pinned by other adapters (the request waits)."""
        if name not in self.paths:
            raise UnknownLoraError(name)
        slot = self.slot_of(name)
        if slot is None:
            free = [s for s in range(self.num_slots) if self.slot_users[s] == 0]
            if not free:
                return None
            slot = min(free, key=lambda s: (self.slot_name[s] is not None, self.slot_tick[s]))
            self.weights.write(slot, self._adapter(name))
            self.slot_name[slot] = name
            self.counters.slot_loads += 1
        self.slot_users[slot] += 1
        self._tick += 1
        self.slot_tick[slot] = self._tick
        self.counters.requests[name] = self.counters.requests.get(name, 0) + 1
        return slot

    def release(self, slot: int) -> None:
        if self.slot_users[slot] <= 0:
            raise RuntimeError(f"LoRA slot {slot} released more often than acquired")
        self.slot_users[slot] -= 1
