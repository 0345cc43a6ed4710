"""KV offload to host memory: contexts bounded by host RAM, not by GPU memory."""

from hip_attn.offload.block_cache import BlockCache, CacheStats
from hip_attn.offload.host import HostKV
from hip_attn.offload.layer import OffloadedKV

__all__ = ["BlockCache", "CacheStats", "HostKV", "OffloadedKV"]
