"""Routing logic shared by the router service: KV prefix index, policies, discovery,
incremental detokenization and the OpenAI request/response mapping.

Everything here is plain Python with no server attached, so it is tested directly.
"""
from tandem.routing.block_hash import ROOT_HASH, block_hashes, hash_block
from tandem.routing.kv_index import KvIndex
from tandem.routing.policies import Decision, Policy, WorkerView, make_policy

__all__ = [
    "ROOT_HASH", "Decision", "KvIndex", "Policy", "WorkerView", "block_hashes", "hash_block", "make_policy",
]
