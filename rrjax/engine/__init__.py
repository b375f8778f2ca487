"""The continuous-batching inference engine (see rrjax/engine/core.py): decode slots with per-row lengths,
refilled from a queue as rows finish; compiled programs and their memory."""

from rrjax.engine.core import Engine, Plan, Request, Result, Stats, decode_kernel, default_cache_dtype, plan
from rrjax.engine.memory import DecodeMemoryError, MemoryEstimate, budget, estimate
from rrjax.engine.programs import Buckets, Programs, Spec, bucket, compilation_count

__all__ = ["Buckets", "DecodeMemoryError", "Engine", "MemoryEstimate", "Plan", "Programs", "Request", "Result",
           "Spec", "Stats", "bucket", "budget", "compilation_count", "decode_kernel", "default_cache_dtype",
           "estimate", "plan"]
