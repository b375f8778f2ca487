"""ReasonRank as a service and as a library: `rrjax.Reranker` (rrjax/serve/reranker.py) and
`python -m rrjax.serve` (the /v1/rerank API, rrjax/serve/app.py, on one shared engine)."""

from rrjax.serve.reranker import Cancelled, QueueFull, RankedDocument, Reranker, RerankResult, Window

__all__ = ["Cancelled", "QueueFull", "RankedDocument", "RerankResult", "Reranker", "Window"]
