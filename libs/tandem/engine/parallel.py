"""Tensor and expert parallelism across processes with ``torch.distributed``: one mechanism.

Ranks
    ``world_size = max(tp_size, ep_size)`` ranks, one process each (gloo on CPU, NCCL on CUDA;
    control messages always go over a gloo CPU group). Rank 0, the *leader*, is the engine a
    service drives; ranks 1.. are *followers* that run every forward pass the leader broadcasts
    (below). What a rank holds depends on the sizes:

    * ``tp_size > 1`` (tensor parallelism, ``tandem.engine.tensor_parallel``): its heads of every
      attention layer, its share of every MLP and of the vocabulary, and a KV pool of its heads;
      MoE experts sharded along their intermediate size (``ep_size == 1``) or whole experts
      placed by EP (``ep_size == tp_size``);
    * ``tp_size == 1, ep_size > 1`` (expert parallelism alone): the dense part of the model
      (embeddings, attention, norms, dense MLPs, routers, shared experts) and its own full KV
      pool; in every MoE layer only the weights of its own physical slots,
      ``ExpertLocation.slots_of_rank(rank)`` (a placement may have redundant slots).

Tensor parallelism: every rank runs the whole batch on its shard; ``o_proj`` and ``down_proj``
(and TP-sharded experts' rows) are all-reduced, the embedding all-reduced from each rank's rows,
the logits all-gathered, so every rank holds the same hidden states (up to float summation order).

One MoE layer with expert parallelism (``tandem.engine.model.MoE.forward``; its ``ExpertDispatcher``,
built at construction from this rank's place in the group, carries the local slots and the all-reduce)
    1. every rank routes all ``T`` tokens (same hidden states, so the same top-k);
    2. dispatch maps logical ids to physical slots the same way on every rank (``static`` by
       token index, ``dynamic`` from the batch's counts, ``random`` from a seeded hash);
    3. each rank computes the ``(token, entry)`` rows whose slot is local into
       ``rows [T, KS, hidden]``, the others stay zero (a folded shared expert: rank 0's rows);
    4. ``all_reduce(SUM)`` over the EP group: each row is non-zero on exactly one rank,
       so the reduction adds only zeros and is exact;
    5. every rank sums each token's rows in order (an unfolded shared expert is added after).
    Hidden states are therefore bit-identical on every rank and to a one-rank run with the
    same placement. The price of exactness: ``k * hidden`` values per token and layer are
    reduced (``k`` times a partial-sum reduce); an all-to-all dispatch is the scalable variant.

Lockstep (design: broadcast the scheduled batch)
    Rank 0, the *leader*, is an ordinary ``EngineCore`` a service drives, built for its ranks
    (``EngineCore(config, parallel=group)``): scheduler, radix cache, requests and sampling live
    there only. Built so, the engine first sends the followers an init message (``group.lead``:
    what they build, the same model shard and a KV pool page for page like its own), then builds
    its ``ModelRunner`` with the returned broadcast side (``LeaderBroadcast``) as its
    ``ForwardMirror`` (``tandem.engine.forward_mirror``): right before each forward pass the runner
    hands it the pass (``ForwardPass``: per request its first new position, new token ids and page
    indices; whether it replays a CUDA graph), which broadcasts it with any new expert placement
    over the gloo group and holds the group until the pass ends. Each *follower*
    (``ParallelFollower``) builds the same ``ForwardBatch`` with the same ``ModelRunner.build`` and
    runs the model on its own KV pool. That pool mirrors the leader's page for page (same slot
    mapping; with EP the same K/V, with TP this rank's heads), hence prefix-cache hits, chunked
    prefill, preemption and aborts need nothing on followers. Only the leader samples, so sampling
    seeds play no role. ``ParallelLeader`` is rank 0's handle on the rest (rank agents, keepalives,
    shutdown), sending through the engine's mirror (``engine.mirror``). While idle the leader sends a
    no-op every ``keepalive_s`` (call ``leader.keepalive()`` from the engine loop's poll hook) so the
    followers' pending broadcast never reaches the collective timeout.

CUDA graphs (TP)
    The init message goes out before the leader's runner exists; with CUDA graphs both sides then
    warm the device group's communicator and capture the same buckets in the same order, so the
    collectives inside the captures match. Each forward message says whether the leader replays a
    graph: every rank launches the same collectives (a pass with prompt logprobs or expert recording
    runs eagerly everywhere).

Failure
    Every collective is bounded by the group's timeout (``--dist-timeout``). A follower that
    exited, or a broadcast or forward-pass collective that failed, marks the group broken
    (``leader.failure``): that step and every later one raise ``RuntimeError`` naming the cause,
    and the worker takes itself out (``tandem.worker.process``).

Placement changes (EPLB)
    Each rank's ``EplbRuntime`` (``engine.eplb``) holds only its slots; the loader keeps every
    logical expert's weights on the host (or regenerates dummy ones), and a plan applied between
    forward passes copies only the changed local slots, in place. The leader's broadcast side ships
    the new placement with the next forward pass; followers apply it before running that pass.

Rank agents (KV written from outside)
    A service may need an object on every rank next to that rank's KV pool, e.g. PD
    disaggregation's transfer sender or receiver: ``leader.attach(name, factory, *args)`` builds
    ``factory(pool, model, *args)`` on every follower (a picklable module-level function: the
    engine knows nothing of what it builds), and ``leader.call(name, {rank: [(method, args)]})``
    runs methods on them and returns each rank's results, in the same lockstep as the forward
    passes (a call is a broadcast followed by a gather over the gloo group, so it is ordered after
    every forward pass the leader sent before it: a follower's pages are final when it sends them).
    Requests whose KV is written from outside (``allocate_external`` / ``activate_external``, the
    decode side of PD) need such an agent receiving on every rank: without one attached with
    ``receives_kv=True`` the leader's runner refuses them with ``RuntimeError`` (only the
    leader's pool would hold their pages).

API::

    group = init_parallel(rank, world_size, "tcp://127.0.0.1:29500", tp_size=2)   # or env://
    engine = EngineCore(config=engine_config, parallel=group)          # rank 0
    leader = ParallelLeader(engine, group)
    ParallelFollower(engine_config, group).run()          # ranks 1.., returns at close()
    leader.close()

    leader = start_parallel(engine_config)   # one host: spawns ranks 1..world_size-1 and does the above
    engine = leader.engine

Small TP all-reduces on CUDA go through ``tandem.engine.custom_all_reduce`` where every rank can
(``init_parallel(custom_all_reduce=...)``, ``--disable-custom-all-reduce``), the rest through NCCL.

NCCL: every rank's process gets ``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` and
``NVSHMEM_DISABLE_NVLS=1`` (``MULTICAST_OFF``) before its group forms: NVLink multicast stays off.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from tandem.config.schemas import EngineConfig
from tandem.eplb.placement import ExpertLocation

from .custom_all_reduce import open_custom_all_reduce
from .engine_config import resolve_device
from .forward_mirror import ForwardPass
from .kv_pool import KVPool
from .loader import load_model, resolve_dtype
from .model_runner import ModelRunner
from .moe_hooks import ExpertHooks
from .tensor_parallel import ONE_RANK, TensorParallel

log = logging.getLogger(__name__)

__all__ = [
    "ParallelGroup", "init_parallel", "LeaderBroadcast", "ParallelLeader", "ParallelFollower", "start_parallel",
    "follower_main", "MULTICAST_OFF",
]

# Set in every rank's environment before NCCL starts: NVLink multicast (NVLS) stays off on the
# machines tandem runs on (their fabric manager does not grant it; NCCL would fail or hang).
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


# ---------------------------------------------------------------------------------- the group
@dataclass
class ParallelGroup:
    """This process's place among a worker's ranks, with the two process groups it talks over.

    ``size`` ranks in all; ``tp_size`` of them shard the model by tensors (1: none), ``ep_size``
    place experts (1: none); ``size == max(tp_size, ep_size)``."""

    rank: int
    size: int
    device: torch.device
    group: object = None  # collectives on the model's device (gloo or nccl)
    cpu_group: object = None  # gloo: control messages (batches, placements)
    store: object = None  # the rendezvous TCPStore (rank 0 hosts it; kept until every rank left)
    tp_size: int = 1
    ep_size: int = 0  # 0: size (expert parallelism alone, as before TP existed)
    custom_all_reduce: object = None  # the TP all-reduce of small messages (tandem.engine.custom_all_reduce)

    def __post_init__(self):
        if self.ep_size == 0:
            self.ep_size = self.size if self.tp_size == 1 else 1
        if self.size != max(self.tp_size, self.ep_size):
            raise ValueError(f"{self.size} ranks for tp_size={self.tp_size}, ep_size={self.ep_size}: "
                             f"need max(tp_size, ep_size) = {max(self.tp_size, self.ep_size)}")

    @property
    def tp(self) -> TensorParallel:
        """What the model's layers get at construction: this rank's TP place and collectives."""
        if self.tp_size == 1:
            return ONE_RANK
        return TensorParallel(self.rank, self.tp_size, self.group, expert_sharded=self.ep_size == 1,
                              custom=self.custom_all_reduce)

    def all_reduce(self, t: torch.Tensor) -> None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)

    def broadcast_tensor(self, t: torch.Tensor) -> None:
        """Rank 0's ``t`` into every rank's ``t``, on the model's device (in stream order)."""
        dist.broadcast(t, src=0, group=self.group)

    def broadcast(self, obj=None):
        """Rank 0 sends ``obj``; every rank returns it."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group, device=torch.device("cpu"))
        return box[0]

    def lead(self, *, config: EngineConfig, model, model_config, pool: KVPool, eplb,
             attention_backend: str, max_positions: int, cuda_graph_max_bs: int) -> LeaderBroadcast:
        """Rank 0's start of the lockstep, called by ``EngineCore(config, parallel=group)`` once its
        model and KV pool exist and before its runner does: checks that they were built for this
        group, sends the followers the init message (they build the same model shard and a pool page
        for page like ``pool``: nothing reaches them before it) and, with CUDA graphs, warms the
        device group's communicator as they do, so the runner built next captures its graphs while
        the followers capture theirs (the collectives inside match). Returns the broadcast side
        (``LeaderBroadcast``), which the runner takes as its ``ForwardMirror``. ValueError for a
        model the group cannot serve."""
        if self.rank != 0:
            raise ValueError(f"the leader must be rank 0, this process is rank {self.rank}")
        if self.ep_size > 1 and not model.moe_layers():
            raise ValueError(f"ep_size={self.ep_size}: expert parallelism needs a MoE model; "
                             f"{config.model_path} has none")
        if self.ep_size > 1 and (eplb is None or eplb.dispatcher.ep_size != self.ep_size):
            raise ValueError("the engine was not built for this expert-parallel group "
                             "(EngineCore(config, parallel=group))")
        if model.tp.size != self.tp_size:
            raise ValueError(f"the engine's model is sharded over {model.tp.size} ranks, the group has "
                             f"tp_size={self.tp_size} (EngineCore(config, parallel=group))")
        self.broadcast(_init_message(self, config, model, model_config, pool, eplb, attention_backend,
                                     max_positions, cuda_graph_max_bs))
        if cuda_graph_max_bs:
            _warm_communicator(self)
        return LeaderBroadcast(self, eplb)

    def destroy(self) -> None:
        # Drop our references first: a process group that outlives destroy_process_group()
        # is destructed at interpreter exit, where gloo's threads can abort the process.
        self.group = self.cpu_group = self.custom_all_reduce = None
        if dist.is_initialized():
            dist.destroy_process_group()


def init_parallel(
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str | None = None,
    backend: str | None = None,
    device: str = "cpu",
    timeout_s: float = 600.0,
    tp_size: int = 1,
    ep_size: int = 0,
    custom_all_reduce: bool = True,
) -> ParallelGroup:
    """Join the worker's group (``world_size`` ranks, this one ``rank``; ``tp_size`` / ``ep_size`` as
    in ``ParallelGroup``). ``timeout_s`` bounds every collective: a rank that died makes the others
    fail there instead of hanging.

    ``rank`` / ``world_size`` default to the env vars RANK / WORLD_SIZE and ``init_method``
    to ``env://`` (MASTER_ADDR / MASTER_PORT). ``backend`` defaults to nccl for a CUDA
    ``device`` (rank ``r`` uses ``cuda:r`` unless the device names an index), gloo otherwise.
    ``custom_all_reduce``: with NCCL and ``tp_size > 1``, small TP all-reduces go through
    ``tandem.engine.custom_all_reduce`` where every rank can (one host, peer access; else NCCL).
    """
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", rank % max(1, torch.cuda.device_count()))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if backend == "nccl":
        os.environ.update(MULTICAST_OFF)
    timeout = timedelta(seconds=timeout_s)
    store = None
    if not dist.is_initialized():
        store = _rendezvous_store(init_method or "env://", rank, world_size, timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    elif (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        raise ValueError(f"torch.distributed is already initialized as rank {dist.get_rank()} of "
                         f"{dist.get_world_size()}, not {rank} of {world_size}")
    group = dist.group.WORLD
    cpu_group = group if dist.get_backend(group) == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    custom = None
    if dist.get_backend(group) == "nccl" and world_size > 1:  # the same test on every rank: all join the collective
        custom = open_custom_all_reduce(rank, world_size, dev, cpu_group, enabled=custom_all_reduce and tp_size > 1)
    return ParallelGroup(rank, world_size, dev, group, cpu_group, store, tp_size, ep_size, custom)


def _rendezvous_store(init_method: str, rank: int, world_size: int, timeout: timedelta):
    """The TCPStore of ``tcp://host:port`` or ``env://`` (MASTER_ADDR / MASTER_PORT); rank 0 hosts it."""
    if init_method == "env://":
        host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), os.environ.get("MASTER_PORT", "")
    elif init_method.startswith("tcp://"):
        host, _, port = init_method[len("tcp://"):].rpartition(":")
    else:
        raise ValueError(f"init_method={init_method!r}: use tcp://host:port or env://")
    if not port.isdigit():
        raise ValueError(f"init_method={init_method!r}: no port (tcp://host:port, or MASTER_PORT with env://)")
    return dist.TCPStore(host, int(port), world_size, is_master=rank == 0, timeout=timeout)


# ---------------------------------------------------------------------------------- rank 0
def _warm_communicator(ep: ParallelGroup) -> None:
    """One all-reduce on the device group before any CUDA graph capture: NCCL sets its communicator
    up at the first collective, which must not happen inside a capture."""
    t = torch.zeros(1, device=ep.device)
    ep.all_reduce(t)
    torch.cuda.synchronize(ep.device)


def _init_message(ep: ParallelGroup, config: EngineConfig, model, model_config, pool: KVPool, eplb,
                  attention_backend: str, max_positions: int, cuda_graph_max_bs: int) -> dict:
    """What every follower builds from (``ParallelFollower``): the same model shard and a KV pool
    page for page like the leader's."""
    location = eplb.location if eplb is not None else None
    return {"kind": "init", "num_pages": pool.num_pages, "page_size": pool.page_size,
            "tp_size": ep.tp_size, "ep_size": ep.ep_size,
            "placement": None if location is None else location.physical_to_logical,
            "num_experts": None if location is None else location.num_logical,
            "dispatch": config.ep_dispatch_algorithm, "seed": config.random_seed,
            "load_format": config.load_format,
            "model": _model_signature(model, model_config),
            "attention_backend": attention_backend,
            "max_positions": max_positions,
            # The KV cache as the leader stores it (--kv-cache-dtype and its scales):
            # every rank's attention must read the same values.
            "kv_dtype": str(pool.dtype).removeprefix("torch."), "kv_scales": pool.scales(),
            # Rank agents receiving KV (PD decode) write aux rows into the same slots.
            "num_aux_slots": pool.aux.shape[0],
            # Decode CUDA graphs (CUDA, TP): every rank captures the same buckets.
            "cuda_graph_max_bs": cuda_graph_max_bs}


class LeaderBroadcast:
    """Rank 0's side of the lockstep: every message to the followers leaves through here, in order,
    under one lock, and the group's failure is kept here. It is the leader engine's ``ForwardMirror``
    (``engine.mirror``: each forward pass is sent right before it runs and holds the lock until it
    ends, so no other message cuts in); ``ParallelLeader`` sends the rest (rank agents, keepalives,
    stop) through it. Built by :func:`lead`."""

    def __init__(self, ep: ParallelGroup, eplb=None):
        self.ep, self.eplb = ep, eplb
        self._lock = threading.RLock()
        self._last_send = time.monotonic()
        self._closed = False
        self._external_kv = False
        self._sent_location = eplb.location if eplb is not None else None  # the followers got it with init
        self.failure: str | None = None  # set once a rank died or a collective failed: the group is unusable
        self.processes: list = []  # the followers this host started (start_parallel): checked before each send
        self.messages_sent = {"forward": 0, "noop": 0, "placement": 0, "call": 0, "future": 0}

    # ---- ForwardMirror -----------------------------------------------------------------
    @property
    def accepts_external_kv(self) -> bool:
        return self._external_kv

    @contextlib.contextmanager
    def mirroring(self, fp: ForwardPass):
        with self._lock:
            self.send({"kind": "forward", "pass": fp})
            yield

    def collective_status(self) -> torch.Tensor | None:
        car = self.ep.custom_all_reduce
        return None if car is None else car.status()

    def share_future(self, tokens: torch.Tensor) -> None:
        self.ep.broadcast_tensor(tokens)
        self.messages_sent["future"] += 1

    def fail(self, why: str) -> RuntimeError:
        """Mark the group broken (the first reason is kept); the error to raise."""
        if self.failure is None:
            self.failure = why
            log.error("parallel group of %d ranks is broken: %s", self.ep.size, why)
        return RuntimeError(f"the worker's parallel group is broken: {self.failure}")

    # ---- the rest of the lockstep ------------------------------------------------------------
    def receive_external_kv(self) -> None:
        """Every rank has an agent receiving KV written from outside: accept such requests from now on."""
        self._external_kv = True

    def check_ranks(self) -> str | None:
        """The group's failure, after looking whether a follower process exited (None: healthy)."""
        for r, p in enumerate(self.processes, start=1):
            if self.failure is None and p.exitcode is not None:
                self.fail(f"rank {r} (pid {p.pid}) exited with code {p.exitcode}")
        return self.failure

    def send(self, msg: dict) -> None:
        """Broadcast ``msg`` (with the expert placement when it changed since the last message)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the parallel group is closed")
            if self.check_ranks() is not None:
                raise self.fail(self.failure)
            loc = self.eplb.location if self.eplb is not None else None
            if loc is not self._sent_location:
                msg["placement"] = loc.physical_to_logical
                self._sent_location = loc
                self.messages_sent["placement"] += 1
            try:
                self.ep.broadcast(msg)
            except RuntimeError as exc:
                raise self.fail(f"broadcast to the followers failed: {exc}") from exc
            if msg["kind"] in self.messages_sent:
                self.messages_sent[msg["kind"]] += 1
            self._last_send = time.monotonic()

    def round_trip(self, msg: dict) -> dict[int, object]:
        """Send ``msg``, then gather every follower's answer: {rank: answer}."""
        with self._lock:
            self.send(msg)
            answers = [None] * self.ep.size
            try:
                dist.gather_object(None, answers, dst=0, group=self.ep.cpu_group)
            except RuntimeError as exc:
                raise self.fail(f"a follower did not answer {msg['kind']!r}: {exc}") from exc
        return {r: answers[r] for r in range(1, self.ep.size)}

    def keepalive(self, interval_s: float) -> None:
        """A no-op when nothing was sent for ``interval_s`` (a failure is recorded, not raised)."""
        with self._lock:
            if self._closed or self.check_ranks() is not None:
                return
            if time.monotonic() - self._last_send >= interval_s:
                with contextlib.suppress(RuntimeError):  # recorded in self.failure
                    self.send({"kind": "noop"})

    def close(self, timeout: float) -> None:
        """Stop the followers (they return from ``run()``), wait ``timeout`` for the processes this
        host started (then terminate them) and leave the group."""
        with self._lock:
            if self._closed:
                return
            if self.check_ranks() is None:
                with contextlib.suppress(RuntimeError):  # a rank died meanwhile: recorded, terminated below
                    self.send({"kind": "stop"})
            self._closed = True
        if self.failure is not None:
            timeout = 0.0  # broken: no follower is waiting for a message any more
        # Tear down together with the followers (NCCL's communicator finalize is collective),
        # keeping rank 0's TCPStore (ep.store) alive until they are gone.
        if self.failure is None:
            self.ep.destroy()
        for p in self.processes:
            p.join(timeout)
            if p.is_alive():
                log.warning("follower pid %s did not stop in %.0f s; terminating it", p.pid, timeout)
                p.terminate()
                p.join(timeout=10)
        if self.failure is not None:
            # After the followers are gone: a broken gloo group tears down without waiting for them.
            self.ep.destroy()
        self.ep.store = None


class ParallelLeader:
    """Rank 0's handle on the followers of ``engine`` (built with ``parallel=group``, whose runner
    mirrors every forward pass through ``engine.mirror``): rank agents, keepalives, shutdown.

    ``eplb`` is the engine's ``EplbRuntime`` with expert parallelism (submit / apply_pending as
    usual: the next forward pass carries the new placement to the followers), else None.
    """

    def __init__(self, engine, ep: ParallelGroup, keepalive_s: float = 10.0, processes: list = ()):
        """``processes``: the followers this host started (a rank that exits breaks the group)."""
        link = engine.mirror
        if not isinstance(link, LeaderBroadcast) or link.ep is not ep:
            raise ValueError("the engine was not built for this parallel group (EngineCore(config, parallel=group))")
        self.engine, self.ep, self.keepalive_s = engine, ep, keepalive_s
        self.eplb = engine.eplb
        self.link = link
        link.processes = list(processes)

    @property
    def failure(self) -> str | None:
        """Why the group is broken (a rank died or a collective failed), None while healthy."""
        return self.link.failure

    @property
    def processes(self) -> list:
        return self.link.processes

    @property
    def messages_sent(self) -> dict[str, int]:
        """Messages sent so far by kind (forward, noop, placement, call)."""
        return self.link.messages_sent

    # ---- rank agents -----------------------------------------------------------------
    def attach(self, name: str, factory, *args, receives_kv: bool = False) -> None:
        """Build ``factory(pool, model, *args)`` on every follower as its agent ``name`` (see the
        module docstring). ``receives_kv``: the agents receive KV written from outside into their
        rank's pool (PD decode), so the engine's runner accepts such requests from now on.
        Raises RuntimeError naming every rank whose factory failed."""
        replies = self.link.round_trip({"kind": "attach", "name": name, "factory": factory, "args": args})
        failed = [f"rank {r}: {value}" for r, (ok, value) in replies.items() if not ok]
        if failed:
            raise RuntimeError(f"rank agent {name!r} could not be built: {'; '.join(failed)}")
        if receives_kv:
            self.link.receive_external_kv()

    def call(self, name: str, calls: dict[int, list[tuple[str, tuple]]]) -> dict[int, list[tuple[bool, object]]]:
        """Run ``calls[r]`` (``(method, args)`` in order) on follower ``r``'s agent ``name``; returns
        per rank one ``(True, result)`` or ``(False, "Type: message")`` per call, in order (a rank
        not named runs nothing and answers ``[]``). A rank that does not answer breaks the group:
        RuntimeError, as for a failed forward pass."""
        return self.link.round_trip({"kind": "call", "name": name, "calls": calls})

    def keepalive(self) -> None:
        """Call often while idle (from the engine loop's thread): a no-op every ``keepalive_s``."""
        self.link.keepalive(self.keepalive_s)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the followers (they return from ``run()``) and leave the group."""
        self.link.close(timeout)


class ParallelFollower:
    """Rank ``ep.rank > 0``: its part of the model and a KV pool page-for-page like the leader's
    (its own heads with TP); no scheduler."""

    def __init__(self, config: EngineConfig, ep: ParallelGroup):
        if ep.rank == 0:
            raise ValueError("rank 0 is the leader; followers are ranks 1..world_size-1")
        self.ep = ep
        device = str(ep.device)
        init = ep.broadcast()  # the leader sends it once its engine is built
        if init.get("kind") != "init":
            raise RuntimeError(f"follower {ep.rank}: expected the leader's init message, got {init.get('kind')}")
        if (init["tp_size"], init["ep_size"]) != (ep.tp_size, ep.ep_size):
            raise ValueError(f"follower {ep.rank}: tp_size={ep.tp_size}, ep_size={ep.ep_size} but the leader has "
                             f"tp_size={init['tp_size']}, ep_size={init['ep_size']}")
        # The leader's dispatch and seed: every rank must pick the same slots.
        config = config.model_copy(update={"ep_dispatch_algorithm": init["dispatch"], "random_seed": init["seed"],
                                           "ep_size": ep.ep_size, "tp_size": ep.tp_size})
        hooks = None
        if init["placement"] is not None:  # the leader's MoE layers have a placement (EP, EPLB, recording)
            location = ExpertLocation(init["placement"], init["num_experts"], ep.ep_size)
            ep_rank = ep.rank if ep.ep_size > 1 else 0
            hooks = ExpertHooks(config, device, ep_rank, ep.ep_size, ep.all_reduce if ep.ep_size > 1 else None,
                                location=location, with_recorder=False)
        deterministic = config.enable_deterministic_inference
        self.model, self.model_config = load_model(config.model_path, resolve_dtype(config.dtype, device), device,
                                                   hooks, init["load_format"], deterministic=deterministic,
                                                   tp=ep.tp)
        mc = self.model_config
        mine = _model_signature(self.model, mc)
        if init["model"] != mine:
            raise ValueError(f"follower {ep.rank}: its model {mine} differs from the leader's {init['model']} "
                             "(same checkpoint and dtype needed on every rank)")
        self.model.set_backend(init["attention_backend"], init["max_positions"], deterministic)  # the leader's kernels
        k_scales, v_scales = init["kv_scales"]
        self.pool = KVPool(mc.num_layers, init["num_pages"], init["page_size"], self.model.kv_heads_per_rank,
                           mc.head_dim, getattr(torch, init["kv_dtype"]), device, num_aux_slots=init["num_aux_slots"],
                           k_scales=k_scales or None, v_scales=v_scales or None)
        self.eplb = hooks.runtime(self.model) if hooks is not None else None
        graphs = init["cuda_graph_max_bs"]
        if graphs:
            _warm_communicator(ep)  # as the leader does, before both capture
        self.runner = ModelRunner(self.model, self.pool, device, graphs)
        self.forward_passes = 0
        self.agents: dict[str, object] = {}  # the leader's rank agents (attach), by name

    def step(self) -> bool:
        """Handle one message from the leader; False once it said stop."""
        msg = self.ep.broadcast()
        if msg.get("placement") is not None:
            loc = ExpertLocation(msg["placement"], self.eplb.location.num_logical, self.ep.ep_size)
            self.eplb.set_location(loc)
        kind = msg["kind"]
        if kind == "forward":
            fp = msg["pass"]  # a ForwardPass
            if n := fp.future_count():  # overlap scheduling: rank 0's tokens still being sampled
                self.ep.broadcast_tensor(self.runner.future_buffer(n))
            self.runner.forward(fp.items(), eager=not fp.graph)
            self.forward_passes += 1
        elif kind == "attach":
            def build() -> None:
                self.agents[msg["name"]] = msg["factory"](self.pool, self.model, *msg["args"])

            self._answer(self._run_one(build))
        elif kind == "call":
            if self.ep.device.type == "cuda":
                torch.cuda.synchronize(self.ep.device)  # the forward passes before it wrote the pages
            agent = self.agents.get(msg["name"])
            self._answer([self._run_one(lambda m=m, a=a: getattr(agent, m)(*a)) if agent is not None
                          else (False, f"RuntimeError: no agent {msg['name']!r} on rank {self.ep.rank}")
                          for m, a in msg["calls"].get(self.ep.rank, [])])
        elif kind == "stop":
            return False
        return True

    @staticmethod
    def _run_one(fn) -> tuple[bool, object]:
        try:
            return True, fn()
        except Exception as exc:  # the leader decides; the follower keeps serving
            return False, f"{type(exc).__name__}: {exc}"

    def _answer(self, obj) -> None:
        dist.gather_object(obj, None, dst=0, group=self.ep.cpu_group)

    def run(self) -> None:
        try:
            while self.step():
                pass
        finally:
            for agent in self.agents.values():
                close = getattr(agent, "close", None)
                if close is not None:
                    with contextlib.suppress(Exception):
                        close()


def _model_signature(model, mc) -> dict:
    return {"layers": mc.num_layers, "hidden": mc.hidden_size, "experts": mc.num_experts,
            "vocab": mc.vocab_size, "dtype": str(model.embed_tokens.weight.dtype), "tp": model.tp.size}


# ---------------------------------------------------------------------------------- one host
def follower_main(rank: int, world_size: int, init_method: str, config: dict, backend: str | None = None,
                  num_threads: int | None = None, timeout_s: float = 600.0) -> None:
    """Entry point of a follower process (picklable for ``multiprocessing`` spawn)."""
    if num_threads:
        torch.set_num_threads(num_threads)
    cfg = EngineConfig(**config)
    group = init_parallel(rank, world_size, init_method, backend, resolve_device(cfg.device), timeout_s,
                          cfg.tp_size, cfg.ep_size, not cfg.disable_custom_all_reduce)
    follower = None
    try:
        follower = ParallelFollower(cfg, group)
        follower.run()
    finally:
        # The model's TP/EP layers hold the process group, inside reference cycles: collect them
        # before leaving the group, or the group is destructed at interpreter exit, where gloo's
        # threads abort the process (seen once in a full run: a follower ended with SIGABRT,
        # "terminate called without an active exception", after a clean stop).
        del follower
        gc.collect()
        group.destroy()


def start_parallel(config: EngineConfig, init_method: str | None = None, backend: str | None = None,
                   num_threads: int | None = None, timeout_s: float | None = None,
                   keepalive_s: float = 10.0) -> ParallelLeader:
    """One host: spawn followers 1..world_size-1 (``config.tp_size`` / ``config.ep_size``), join as
    rank 0, build the engine over the group and attach the leader to it (``leader.engine``).

    ``init_method`` defaults to a free loopback TCP port. Call ``leader.close()`` at shutdown (it
    joins the follower processes). ``timeout_s`` bounds every collective (default ``config.dist_timeout``).
    """
    import torch.multiprocessing as mp

    from .engine import EngineCore

    world = config.world_size
    timeout_s = config.dist_timeout if timeout_s is None else timeout_s
    if world < 2:
        raise ValueError(f"tp_size={config.tp_size}, ep_size={config.ep_size}: one rank needs no group")
    if init_method is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            init_method = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    device = resolve_device(config.device)
    if device.startswith("cuda"):
        os.environ.update(MULTICAST_OFF)  # spawned followers inherit it
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=follower_main, name=f"tandem-rank-{r}", daemon=True,
                         args=(r, world, init_method, config.model_dump(), backend, num_threads, timeout_s))
             for r in range(1, world)]
    for p in procs:
        p.start()
    try:
        group = init_parallel(0, world, init_method, backend, device, timeout_s, config.tp_size, config.ep_size,
                              not config.disable_custom_all_reduce)
        engine = EngineCore(config=config, parallel=group)  # sends the followers the init message
        leader = ParallelLeader(engine, group, keepalive_s=keepalive_s, processes=procs)
    except BaseException:
        for p in procs:
            p.terminate()
        raise
    return leader


def main(argv=None) -> None:
    """``python -m tandem.engine.parallel``: one follower rank, for leaders on another host."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--rank", type=int, default=None, help="default: $RANK")
    ap.add_argument("--tp-size", "--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--ep-size", type=int, default=1)
    ap.add_argument("--init-method", default=None, help="e.g. tcp://leader:29500 (default env://)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--num-threads", type=int, default=None)
    ap.add_argument("--timeout-s", type=float, default=600.0)
    ap.add_argument("--disable-custom-all-reduce", action="store_true",
                    help="NCCL for every TP all-reduce (as the leader's flag; every rank must agree to use it)")
    a = ap.parse_args(argv)
    rank = a.rank if a.rank is not None else int(os.environ.get("RANK", "1"))
    cfg = {"model_path": a.model_path, "device": a.device, "dtype": a.dtype, "tp_size": a.tp_size,
           "ep_size": a.ep_size, "disable_custom_all_reduce": a.disable_custom_all_reduce}
    follower_main(rank, max(a.tp_size, a.ep_size), a.init_method, cfg, a.backend, a.num_threads, a.timeout_s)


if __name__ == "__main__":
    main()
