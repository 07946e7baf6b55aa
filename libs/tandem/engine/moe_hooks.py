"""What a MoE model's layers get at construction, from the engine's configuration.

``ExpertHooks`` is handed to ``load_model``; the loader calls ``build(model_config,
num_moe_layers)`` once it knows the model's shape and passes the result to every MoE layer:

* the ``ExpertDispatcher`` (``tandem.eplb.dispatch``): the placement's device tables
  (``--init-expert-location`` over ``num_experts + --ep-num-redundant-experts`` slots per layer,
  ``--ep-dispatch-algorithm``) and, with expert parallelism, this rank's slots and all-reduce.
  None when nothing needs one (no EPLB, no EP, no recorder): then slot = expert id;
* the ``ExpertDistributionRecorder`` (``--expert-distribution-recorder-mode``, or stat with
  ``--enable-eplb``, recording from the start with EPLB), on the model's device.

After loading, ``runtime(model)`` gives the engine its ``EplbRuntime`` (plans applied in place,
the recorder folded between steps). With expert parallelism a rank holds only its own slots, so a
plan may need an expert it does not have: the loader keeps every logical expert on the host
(``keep_experts``) or, for dummy weights, a way to regenerate them (``store``).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from tandem.config.schemas import EngineConfig
from tandem.eplb.dispatch import ExpertDispatcher
from tandem.eplb.placement import ExpertLocation
from tandem.eplb.recorder import ExpertDistributionRecorder
from tandem.eplb.runtime import EplbRuntime, ExpertStore

from .tensor_parallel import ONE_RANK, TensorParallel

__all__ = ["ExpertHooks", "expert_hooks", "tp_of"]


class ExpertHooks:
    def __init__(self, config: EngineConfig, device: str, rank: int = 0, ep_size: int = 1,
                 all_reduce: Callable[[torch.Tensor], None] | None = None, location: ExpertLocation | None = None,
                 with_recorder: bool = True):
        """``location``: the placement to use (an EP follower gets its leader's), else from the config."""
        self.config, self.device = config, device
        self.rank, self.ep_size, self.all_reduce = rank, ep_size, all_reduce
        self.location = location
        self.with_recorder = with_recorder
        self.dispatcher: ExpertDispatcher | None = None
        self.recorder: ExpertDistributionRecorder | None = None
        self.store: ExpertStore | None = None
        self._host: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def keep_experts(self) -> bool:
        """Whether the loader must keep every logical expert's weights (EP: for plans)."""
        return self.ep_size > 1

    def build(self, mc, num_moe_layers: int) -> tuple[ExpertDispatcher | None, ExpertDistributionRecorder | None]:
        cfg = self.config
        if cfg.ep_size > 1 and self.ep_size == 1:
            raise ValueError(f"ep_size={cfg.ep_size}: the engine needs its parallel group "
                             "(tandem.engine.parallel.start_parallel builds both)")
        E = mc.num_experts
        recording = self.with_recorder and (cfg.enable_eplb or cfg.expert_distribution_recorder_mode is not None)
        placed = (self.location is not None or self.ep_size > 1 or cfg.enable_eplb or cfg.ep_num_redundant_experts > 0
                  or cfg.init_expert_location != "trivial" or recording)
        if placed:
            loc = self.location or ExpertLocation.from_init_arg(
                cfg.init_expert_location, num_moe_layers, E, E + cfg.ep_num_redundant_experts, self.ep_size,
                mc.n_group or 1, 1)
            self.dispatcher = ExpertDispatcher(loc, cfg.ep_dispatch_algorithm, self.device, cfg.random_seed,
                                               self.rank, self.all_reduce)
        if recording:
            mode = cfg.expert_distribution_recorder_mode or "stat"
            self.recorder = ExpertDistributionRecorder(
                mode, num_moe_layers, E, cfg.expert_distribution_recorder_buffer_size,
                physical_to_logical=self.dispatcher.location.physical_to_logical, device=self.device)
            if cfg.enable_eplb:
                self.recorder.start()
        return self.dispatcher, self.recorder

    def keep(self, moe_index: int, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """The loader hands over a layer's logical experts ``[E, ...]`` (host) when ``keep_experts``."""
        self._host[moe_index] = (w13, w2)
        self.store = self._from_host

    def _from_host(self, layer: int, logical: int):
        w13, w2 = self._host[layer]
        return w13[logical], w2[logical]

    def runtime(self, model) -> EplbRuntime | None:
        """The engine's EPLB runtime over ``model``'s MoE layers (None without a dispatcher)."""
        if self.dispatcher is None:
            return None
        weights = [m.routed_weights() for m in model.moe_layers()]
        return EplbRuntime(self.dispatcher, weights, self.recorder, self.store)


def expert_hooks(config: EngineConfig, device: str, parallel=None) -> ExpertHooks:
    """The hooks of an engine: one rank, or rank ``parallel.rank`` of its group (``ParallelGroup``)."""
    if parallel is None or config.ep_size == 1:
        return ExpertHooks(config, device)
    if parallel.ep_size != config.ep_size:
        raise ValueError(f"ep_size={config.ep_size} but the parallel group has ep_size={parallel.ep_size}")
    return ExpertHooks(config, device, parallel.rank, parallel.ep_size, parallel.all_reduce)


def tp_of(config: EngineConfig, parallel=None) -> TensorParallel:
    """The model's tensor-parallel place: ``parallel.tp`` (``ParallelGroup``), or one rank."""
    if config.tp_size == 1:
        return ONE_RANK
    if parallel is None or parallel.tp_size != config.tp_size:
        raise ValueError(f"tp_size={config.tp_size}: the engine needs its parallel group "
                         "(tandem.engine.parallel.start_parallel builds both)")
    return parallel.tp
