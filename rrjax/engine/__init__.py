"""The continuous-batching inference engine (see rrjax/engine/core.py): decode slots with per-row lengths,
refilled from a queue as rows finish; one EngineConfig per engine, planned from a memory budget; compiled
programs and their memory."""

from rrjax.engine.config import EngineConfig, decode_kernel, default_cache_dtype, plan, plans_made
from rrjax.engine.core import Engine, Request, Result, Stats, abstract_programs
from rrjax.engine.memory import DecodeMemoryError, MemoryEstimate, budget, estimate
from rrjax.engine.programs import Buckets, Programs, Spec, bucket, compilation_count

__all__ = ["Buckets", "DecodeMemoryError", "Engine", "EngineConfig", "MemoryEstimate", "Programs", "Request", "Result",
           "Spec", "Stats", "abstract_programs", "bucket", "budget", "compilation_count", "decode_kernel",
           "default_cache_dtype", "estimate", "plan", "plans_made"]
