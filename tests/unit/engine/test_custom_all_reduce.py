"""The custom all-reduce (tandem.engine.custom_all_reduce) on CPU, its kernel under the Triton interpreter.

Ranks are simulated two ways: in one process, one rank at a time, with the flags its peers would
have written set beforehand (the sum, its rank order, the flags and counters it writes, giving up
on a missing peer); and as real processes over shared CPU memory, where the barriers must hold
(the kernel of each rank waits for the other's flags)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from tandem.engine.custom_all_reduce import CustomAllReduce
from tandem.engine.kernels import all_reduce as K
from tandem.engine.tensor_parallel import TensorParallel


def ranks(world: int, nbytes: int = 64 * 1024, shared: bool = False):
    staging = [torch.zeros(nbytes, dtype=torch.uint8) for _ in range(world)]
    signals = [torch.zeros(K.SIGNAL_WORDS, dtype=torch.int32) for _ in range(world)]
    if shared:
        for t in staging + signals:
            t.share_memory_()
    return staging, signals


def peers_arrived(signals, rank: int, world: int, numel: int, call: int) -> None:
    """Write into ``rank``'s signal buffer what every rank writes there during call ``call`` (1..)."""
    for value in (2 * call - 1, 2 * call):
        for block in range(K.grid_size(numel)):
            for q in range(world):
                signals[rank][K.flag_index(value % 2, block, q)] = value


def rank_order_sum(inputs: list[torch.Tensor]) -> torch.Tensor:
    acc = inputs[0].float().clone()
    for x in inputs[1:]:
        acc += x.float()
    return acc.to(inputs[0].dtype)


def inputs_of(world: int, n: int, dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, generator=g).to(dtype) for _ in range(world)]
    # Magnitudes where the order of the additions changes the float32 result.
    xs[0][::3] = 1e8
    xs[-1][::3] = -1e8
    return xs


def run_ranks(world: int, xs: list[torch.Tensor], call: int = 1, staging=None, signals=None):
    if staging is None:
        staging, signals = ranks(world)
    outs = []
    for r in range(world):
        for q in range(world):  # what the peers staged before they wrote their flags
            if q != r:
                staging[q].view(xs[q].dtype)[:xs[q].numel()].copy_(xs[q])
        peers_arrived(signals, r, world, xs[r].numel(), call)
        ar = CustomAllReduce(r, staging, signals)
        outs.append(ar.all_reduce(xs[r].clone()))
    return outs, staging, signals


@pytest.mark.parametrize("world,n,dtype", [(2, 1000, torch.float32), (3, 2500, torch.float32),
                                           (8, 37, torch.float32), (4, 3000, torch.bfloat16)])
def test_every_rank_gets_the_rank_order_sum_bitwise(world, n, dtype):
    xs = inputs_of(world, n, dtype, seed=world)
    outs, _, _ = run_ranks(world, xs)
    for r, out in enumerate(outs):
        assert torch.equal(out, outs[0]), f"rank {r}"
    expected = rank_order_sum(xs)
    if dtype == torch.float32:
        assert torch.equal(outs[0], expected)
    else:  # the interpreter's float32 -> bfloat16 rounding may differ from torch's (by one unit in the last place)
        assert torch.allclose(outs[0].float(), expected.float(), rtol=2**-7, atol=0)
    # ... which is the sum up to float rounding
    assert torch.allclose(outs[0].double(), torch.stack(xs).double().sum(0), rtol=1e-2 if dtype == torch.bfloat16
                          else 1e-6, atol=16.0)


def test_the_order_is_the_ranks_not_this_ranks():
    # In float32, (1e8 + 1) - 1e8 is 0 but (-1e8 + 1e8) + 1 is 1: rank 2, had it started from its
    # own input, would differ from rank 0.
    xs = [torch.full((64,), 1e8), torch.full((64,), 1.0), torch.full((64,), -1e8)]
    outs, _, _ = run_ranks(3, xs)
    assert all(torch.equal(o, torch.zeros(64)) for o in outs)


def test_flags_and_counters_advance_per_call():
    world, n = 3, 2 * K.BLOCK + 5  # three programs
    staging, signals = ranks(world)
    for call in (1, 2, 3):
        xs = inputs_of(world, n, torch.float32, seed=call)
        # Each rank writes its flags into every rank's buffer: clear the ones the test pre-set.
        for s in signals:
            s[K.FLAGS:] = 0
        outs, _, _ = run_ranks(world, xs, call, staging, signals)
        assert all(torch.equal(o, rank_order_sum(xs)) for o in outs)
        blocks = K.grid_size(n)
        for r in range(world):
            assert signals[r][:blocks].tolist() == [2 * call] * blocks  # two barriers a call
            assert signals[r][blocks:K.MAX_BLOCKS].eq(0).all()  # programs not launched: untouched
            assert signals[r][K.STATUS_WORD] == 0
    # The last call's end barrier (value 6, parity 0) left rank 2's value in every rank's slot 2.
    assert all(signals[r][K.flag_index(0, 0, 2)] == 6 for r in range(world))


def test_a_missing_peer_gives_up_and_sets_the_status():
    staging, signals = ranks(2)
    ar = CustomAllReduce(0, staging, signals, max_spin=5)  # rank 1 never arrives
    x = torch.ones(100)
    ar.all_reduce(x)
    assert ar.failed()
    assert torch.equal(x, torch.ones(100))  # no sum without every rank's input
    assert not CustomAllReduce(1, staging, signals).failed()


def test_what_it_takes():
    staging, signals = ranks(2, nbytes=4096)
    ar = CustomAllReduce(0, staging, signals)
    assert ar.max_bytes == 4096
    assert ar.can_reduce(torch.zeros(1024)) and ar.can_reduce(torch.zeros(2048, dtype=torch.bfloat16))
    assert not ar.can_reduce(torch.zeros(1025))  # over max_bytes
    assert not ar.can_reduce(torch.zeros(8, dtype=torch.int64))
    assert not ar.can_reduce(torch.zeros(8, 8).t())  # not contiguous
    assert not ar.can_reduce(torch.zeros(0))
    with pytest.raises(ValueError, match="up to 4096 bytes"):
        ar.all_reduce(torch.zeros(2048))
    with pytest.raises(ValueError, match="one of each per rank"):
        CustomAllReduce(0, staging[:1], signals[:1])


class _Custom:
    def __init__(self, takes: bool):
        self.takes, self.reduced = takes, []

    def can_reduce(self, t):
        return self.takes

    def all_reduce(self, t):
        self.reduced.append(t)
        return t


@pytest.mark.parametrize("takes", [True, False])
def test_tp_all_reduce_uses_it_for_what_it_takes_else_the_group(monkeypatch, takes):
    calls = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op=None, group=None: calls.append(group))
    custom = _Custom(takes)
    tp = TensorParallel(0, 2, group="the-group", custom=custom)
    t = torch.ones(4)
    assert tp.all_reduce(t) is t
    assert (len(custom.reduced), calls) == ((1, []) if takes else (0, ["the-group"]))
    TensorParallel(0, 1, custom=custom).all_reduce(t)  # one rank: nothing to reduce
    assert len(custom.reduced) == (1 if takes else 0)


def _rank_process(rank, staging, signals, rounds, results):
    import triton.runtime.interpreter as interp

    # The interpreter copies every argument's storage back onto itself after a launch; with memory
    # shared between processes that copy could overwrite a flag a peer wrote meanwhile. CPU
    # arguments are the kernel's own memory: nothing to copy back.
    interp.GridExecutor._restore_args_dev = lambda self, *args, **kwargs: None
    torch.set_num_threads(1)
    ar = CustomAllReduce(rank, staging, signals, max_spin=10**9)
    for i, xs in enumerate(rounds):
        results[i][rank].copy_(ar.all_reduce(xs[rank].clone()))
    assert not ar.failed()


def test_two_processes_meet_at_the_barriers():
    world = 2
    staging, signals = ranks(world, shared=True)
    sizes = [300, 5000, 16, 5000]  # changing sizes and inputs, the same staging buffers
    rounds = [inputs_of(world, n, torch.float32, seed=i) for i, n in enumerate(sizes)]
    results = [[torch.full((n,), float("nan")).share_memory_() for _ in range(world)] for n in sizes]
    ctx = mp.get_context("spawn")
    env = os.environ.get("TRITON_INTERPRET")
    assert env == "1"  # inherited by the spawned ranks
    procs = [ctx.Process(target=_rank_process, args=(r, staging, signals, rounds, results)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert codes == [0, 0]
    for xs, outs in zip(rounds, results):
        assert torch.equal(outs[0], rank_order_sum(xs)) and torch.equal(outs[1], outs[0])
    blocks = K.grid_size(5000)  # program 0 ran in all four calls, programs 1.. in the two of 5000 values
    assert signals[0][:blocks].tolist() == signals[1][:blocks].tolist() == [8] + [4] * (blocks - 1)


def test_opened_only_where_every_rank_can(monkeypatch, caplog):
    from tandem.engine import custom_all_reduce as car

    peer = [None]  # what rank 1 answers to the first gather

    def all_gather_object(out, obj, group=None):
        out[0], out[1] = obj, peer[0]

    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    caplog.set_level("INFO", logger=car.__name__)
    peer[0] = (None, "another-host", 0)
    assert car.open_custom_all_reduce(0, 2, torch.device("cpu"), "gloo-group") is None
    assert "rank 0: device cpu is not CUDA; the ranks are on more than one host" in caplog.text
    caplog.clear()
    peer[0] = ("disabled (--disable-custom-all-reduce, or TP size 1)", "h", 0)
    assert car.open_custom_all_reduce(0, 2, torch.device("cpu"), "gloo-group", enabled=False) is None
    assert "rank 0: disabled" in caplog.text and "rank 1: disabled" in caplog.text
