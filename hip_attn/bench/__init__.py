"""Kernel microbenchmarks of HiP attention (``hip-attn bench``).

Each case (a mode, a context length, attention shapes and a :class:`~hip_attn.HiPConfig`) times
HiP end to end and by part (mask estimation, sparse attention), dense attention through torch
SDPA, and ``flex_attention`` driven by the same block selection; it counts the FLOPs and bytes
each does, records peak memory, and sets the analytic model's floor for the same work beside the
measurement. Results are JSON lines under ``bench/results/``; see ``bench/README.md``.

Modules:

* :mod:`.cases`: what one case is, and the default shapes (GPU: Llama-3.1-8B attention; CPU:
  tiny smoke-test sizes);
* :mod:`.work`: FLOPs and bytes HiP, SDPA and flex actually do;
* :mod:`.timing`: medians with warm-up (CUDA events, or the CPU clock) and peak memory;
* :mod:`.sdpa`: dense attention through SDPA, flash backend first;
* :mod:`.flex`: a ``BlockMask`` from the HiP selection, run by compiled ``flex_attention``;
* :mod:`.runner`: one case, every method, into one record;
* :mod:`.offload`: the ``offload`` mode: device memory of an offloaded layer against ``R`` at two
  contexts, and decode steps with offload (refreshing and reusing the selection apart) against
  the same steps on device-resident K/V;
* :mod:`.environment`: device, versions, commit and default output paths;
* :mod:`.report`: JSON lines and the table; :mod:`.plot`: the PNG;
* :mod:`.cli`: the ``hip-attn bench`` command.

Only :mod:`.cli`, :mod:`.cases`, :mod:`.environment`, :mod:`.report` and :mod:`.plot` import
without torch.
"""
