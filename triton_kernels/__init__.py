"""Triton kernels of hip_attn (installed as ``hip_attn.triton_kernels``).

* :mod:`.mask`: hierarchical mask estimation (the tree search);
* :mod:`.tree`: extending the search's summary tree by the blocks decode completes;
* :mod:`.attention`: block-sparse flash attention for prefill and decode (flash-decoding splits);
* :mod:`.tiles`: its launch shapes, the prefill's autotuned among several (Triton-free);
* :mod:`.dtypes`: the dtypes they compute in (``tl.dot`` operands, element offsets).

Each kernel's readable specification is in :mod:`hip_attn.reference` (the tree's in
:func:`hip_attn.geometry.extend_summaries`).
"""
