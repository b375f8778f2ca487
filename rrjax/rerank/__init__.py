"""Reranking a first-stage run with a model: `rerank(queries, model, tokenizer, RerankSettings(...))`, and
`python -m rrjax.rerank` (rrjax/rerank/cli.py). The loops themselves are model-free, in rrjax.ranking."""

from rrjax.rerank.cli import build_parser, main, rerank_across_processes, resolve_settings, settings_from_gin, share
from rrjax.rerank.report import build_report, evaluate_both, merge_reports, report_path, write_outputs
from rrjax.rerank.runner import RerankOutput, rerank
from rrjax.rerank.settings import RerankSettings

__all__ = ["RerankOutput", "RerankSettings", "build_parser", "build_report", "evaluate_both", "main",
           "merge_reports", "report_path", "rerank", "rerank_across_processes", "resolve_settings",
           "settings_from_gin", "share", "write_outputs"]
