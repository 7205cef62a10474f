"""Evaluation metrics and the models behind them (a stage library: imports only ``core``).

Definitions, models and preprocessing of every metric: docs/evaluation.md.
"""
