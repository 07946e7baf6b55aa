"""Expert placement maps: which logical expert each physical slot holds, per MoE layer.

Physical slots are spread evenly over the EP ranks: slot ``s`` lives on rank
``s // slots_per_rank``. A logical expert may own several slots (redundant experts);
each token routed to a logical expert is dispatched to one of its replicas.

``--init-expert-location`` accepts (as SGLang does):

* ``trivial``: slot ``s`` holds logical expert ``s % num_logical`` (round-robin replicas);
* a ``.json`` or ``.pt`` file, or inline JSON, holding a dict with either
  ``physical_to_logical_map`` (``[layers, physical]``) or ``logical_count``
  (``[layers, logical]`` or ``[passes, layers, logical]`` load, which is then balanced
  with ``rebalance_experts``). A recorder dump in ``stat`` mode is such a file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .algorithms import log2phy_from_phy2log, logcnt_from_phy2log, rebalance_experts
from .dispatch import DISPATCH_ALGORITHMS, dispatch_ids

__all__ = ["ExpertLocation", "SlotCopy", "diff", "DISPATCH_ALGORITHMS"]


@dataclass(frozen=True)
class SlotCopy:
    """One expert weight copy needed to go from one placement to another."""

    layer: int
    slot: int  # physical slot that receives new weights
    rank: int  # EP rank owning ``slot``
    logical: int  # logical expert whose weights go into ``slot``
    src_slot: int  # a slot holding ``logical`` in the old placement (same rank preferred)
    src_rank: int


class ExpertLocation:
    """Per-layer physical<->logical expert maps for ``ep_size`` ranks.

    Attributes: ``physical_to_logical`` ``[layers, physical]`` int64,
    ``logical_to_physical`` ``[layers, logical, max_replicas]`` (slot ids ascending,
    padded with -1), ``logical_count`` ``[layers, logical]``.
    """

    def __init__(self, physical_to_logical, num_logical: int, ep_size: int):
        p2l = torch.as_tensor(physical_to_logical)
        if p2l.dtype.is_floating_point:
            raise ValueError("physical_to_logical_map must hold integer expert ids")
        p2l = p2l.long().cpu().contiguous()
        if p2l.dim() != 2:
            raise ValueError(f"physical_to_logical_map must be [layers, physical], got shape {tuple(p2l.shape)}")
        layers, physical = p2l.shape
        if ep_size < 1:
            raise ValueError(f"ep_size must be >= 1, got {ep_size}")
        if physical % ep_size:
            raise ValueError(
                f"{physical} physical slots per layer do not split evenly over ep_size={ep_size} ranks"
            )
        if physical < num_logical:
            raise ValueError(f"{physical} physical slots cannot hold {num_logical} logical experts")
        if layers and (p2l.min() < 0 or p2l.max() >= num_logical):
            bad = p2l[(p2l < 0) | (p2l >= num_logical)][0].item()
            raise ValueError(f"expert id {bad} out of range [0, {num_logical})")
        cnt = logcnt_from_phy2log(p2l, num_logical)
        missing = (cnt == 0).nonzero()
        if len(missing):
            layer, expert = missing[0].tolist()
            raise ValueError(f"logical expert {expert} has no physical replica in layer {layer}")
        self.physical_to_logical = p2l
        self.num_logical = num_logical
        self.ep_size = ep_size
        self.logical_count = cnt
        self.logical_to_physical = log2phy_from_phy2log(p2l, num_logical)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def trivial(cls, num_layers: int, num_logical: int, num_physical: int, ep_size: int) -> ExpertLocation:
        """Slot ``s`` holds logical expert ``s % num_logical``."""
        p2l = (torch.arange(num_physical) % num_logical).repeat(num_layers, 1)
        return cls(p2l, num_logical, ep_size)

    @classmethod
    def from_rebalance(cls, result, num_logical: int, ep_size: int) -> ExpertLocation:
        """From ``rebalance_experts``' ``(phy2log, log2phy, logcnt)`` or a ``MoveAwareResult``."""
        phy2log = result.phy2log if hasattr(result, "phy2log") else result[0]
        return cls(phy2log, num_logical, ep_size)

    @classmethod
    def from_logical_count(
        cls, logical_count, num_physical: int, ep_size: int, num_groups: int = 1, num_nodes: int = 1
    ) -> ExpertLocation:
        """Balance a recorded load ``[layers, logical]`` (or ``[passes, layers, logical]``)."""
        load = torch.as_tensor(logical_count).double()
        if load.dim() == 3:
            load = load.sum(0)
        if load.dim() != 2:
            raise ValueError(f"logical_count must be [layers, logical] or [passes, layers, logical], got {tuple(load.shape)}")
        if (load < 0).any():
            raise ValueError("logical_count has negative entries")
        phy2log, _, _ = rebalance_experts(load, num_physical, num_groups, num_nodes, ep_size)
        return cls(phy2log, load.size(1), ep_size)

    @classmethod
    def from_init_arg(
        cls,
        arg: str,
        num_layers: int,
        num_logical: int,
        num_physical: int,
        ep_size: int,
        num_groups: int = 1,
        num_nodes: int = 1,
    ) -> ExpertLocation:
        """Parse ``--init-expert-location`` and check it against the model's shape."""
        if arg is None or arg == "trivial":
            return cls.trivial(num_layers, num_logical, num_physical, ep_size)
        data = _load_init(arg)
        if "physical_to_logical_map" in data:
            p2l = torch.as_tensor(data["physical_to_logical_map"])
            if p2l.dim() != 2 or tuple(p2l.shape) != (num_layers, num_physical):
                raise ValueError(
                    f"physical_to_logical_map has shape {tuple(p2l.shape)}, the model needs "
                    f"[{num_layers} layers, {num_physical} physical slots]"
                )
            return cls(p2l, num_logical, ep_size)
        if "logical_count" in data:
            cnt = torch.as_tensor(data["logical_count"])
            if tuple(cnt.shape[-2:]) != (num_layers, num_logical) or cnt.dim() not in (2, 3):
                raise ValueError(
                    f"logical_count has shape {tuple(cnt.shape)}, the model needs "
                    f"[{num_layers} layers, {num_logical} logical experts]"
                )
            return cls.from_logical_count(cnt, num_physical, ep_size, num_groups, num_nodes)
        raise ValueError(
            f"init expert location must hold 'physical_to_logical_map' or 'logical_count', got keys {sorted(data)}"
        )

    # ------------------------------------------------------------------ shape helpers
    @property
    def num_layers(self) -> int:
        return self.physical_to_logical.size(0)

    @property
    def num_physical(self) -> int:
        return self.physical_to_logical.size(1)

    @property
    def slots_per_rank(self) -> int:
        return self.num_physical // self.ep_size

    def rank_of_slot(self, slot):
        """EP rank owning a physical slot (int or tensor)."""
        return slot // self.slots_per_rank

    def slots_of_rank(self, rank: int) -> range:
        return range(rank * self.slots_per_rank, (rank + 1) * self.slots_per_rank)

    def local_experts(self, layer: int, rank: int) -> list[int]:
        """Logical expert held by each of ``rank``'s slots, in slot order."""
        s = self.slots_of_rank(rank)
        return self.physical_to_logical[layer, s.start:s.stop].tolist()

    def to_dict(self) -> dict:
        """``{"physical_to_logical_map": [[...]]}``: loadable by ``from_init_arg``."""
        return {"physical_to_logical_map": self.physical_to_logical.tolist()}

    def save(self, path: str) -> None:
        if path.endswith(".pt"):
            torch.save({"physical_to_logical_map": self.physical_to_logical}, path)
        else:
            with open(path, "w") as f:
                json.dump(self.to_dict(), f)

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, ExpertLocation)
            and self.ep_size == other.ep_size
            and self.num_logical == other.num_logical
            and torch.equal(self.physical_to_logical, other.physical_to_logical)
        )

    def __repr__(self) -> str:
        return (
            f"ExpertLocation(layers={self.num_layers}, logical={self.num_logical}, "
            f"physical={self.num_physical}, ep_size={self.ep_size})"
        )

    # ------------------------------------------------------------------ dispatch
    def dispatch(
        self,
        layer: int,
        topk_logical: torch.Tensor,
        algorithm: str = "static",
        positions: torch.Tensor | None = None,
        rank: int | None = None,
        seed: int = 0,
    ) -> torch.Tensor:
        """Map logical top-k ids ``[tokens, k]`` to physical slot ids (same shape), on the host.

        The rules are ``tandem.eplb.dispatch.dispatch_ids``' (static, dynamic, random: the
        device dispatcher runs the same function on its tables); ``positions`` feed ``random``
        (default: the token index). With ``rank`` given, ``static`` prefers a replica on that
        rank when one exists.
        """
        if algorithm not in DISPATCH_ALGORITHMS:
            raise ValueError(f"ep_dispatch_algorithm={algorithm!r}: allowed {', '.join(DISPATCH_ALGORITHMS)}")
        ids = topk_logical.long()
        device = ids.device
        ids = ids.cpu()
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.num_logical):
            raise ValueError(f"topk ids out of range [0, {self.num_logical})")
        pos = None if positions is None else torch.as_tensor(positions).long().cpu()
        out = dispatch_ids(self.logical_to_physical[layer].clamp(min=0), self.logical_count[layer], ids, algorithm,
                           layer, seed, pos)
        if rank is not None and algorithm == "static":
            local = self._local_choice(layer, rank)[ids]
            out = torch.where(local >= 0, local, out)
        return out.to(device)

    def _local_choice(self, layer: int, rank: int) -> torch.Tensor:
        """[logical] first slot of each expert on ``rank`` (or -1)."""
        s = self.slots_of_rank(rank)
        out = torch.full((self.num_logical,), -1, dtype=torch.int64)
        p2l = self.physical_to_logical[layer, s.start:s.stop]
        slots = torch.arange(s.start, s.stop)
        out.scatter_(0, p2l.flip(0), slots.flip(0))  # flip: the lowest slot wins
        return out


def diff(old: ExpertLocation, new: ExpertLocation) -> list[SlotCopy]:
    """Slot copies that turn ``old`` into ``new`` (one per slot whose expert changes).

    ``src_slot`` is a slot that holds the needed expert in ``old`` (on the receiving rank
    when possible, so the copy stays local); engines that keep every expert's weights
    on the host may copy from there instead.
    """
    if (old.num_layers, old.num_physical, old.num_logical, old.ep_size) != (
        new.num_layers, new.num_physical, new.num_logical, new.ep_size
    ):
        raise ValueError(f"cannot diff placements of different shapes: {old!r} vs {new!r}")
    copies: list[SlotCopy] = []
    changed = (old.physical_to_logical != new.physical_to_logical).nonzero().tolist()
    for layer, slot in changed:
        e = int(new.physical_to_logical[layer, slot])
        rank = slot // old.slots_per_rank
        sources = [s for s in old.logical_to_physical[layer, e].tolist() if s >= 0]
        local = [s for s in sources if s // old.slots_per_rank == rank]
        src = (local or sources)[0]
        copies.append(SlotCopy(layer, slot, rank, e, src, src // old.slots_per_rank))
    return copies


def _load_init(arg: str) -> dict:
    """Read a dict from a .json/.pt file or inline JSON."""
    text = arg.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"init expert location: invalid inline JSON ({exc})") from None
    elif not os.path.exists(arg):
        raise ValueError(f"init expert location: no such file {arg!r} (expected trivial, .json, .pt or inline JSON)")
    elif arg.endswith(".pt"):
        data = torch.load(arg, map_location="cpu", weights_only=True)
    else:
        try:
            with open(arg) as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"init expert location: {arg} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"init expert location must be a JSON object / dict, got {type(data).__name__}")
    return data
