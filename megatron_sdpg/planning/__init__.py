"""Memory and step-time planning for a model, a parallel layout and an SDPG workload.

``python -m megatron_sdpg.plan --config FILE.yaml [overrides]`` is the entry
point; the arithmetic lives in :mod:`params` (parameter counts per stage),
:mod:`memory` (bytes per GPU, term by term) and :mod:`flops` (FLOPs and time).
"""
