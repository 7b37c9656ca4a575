"""Insight into a model and its data: ``evaluate`` (metrics, confusion, the most confident
mistakes), ``audit`` (duplicates, likely mislabels and outliers: the command and its report),
``findings`` (the analyses the audit and training's cheap data check share), the
nearest-neighbour search, the plots and the offline HTML reports. The audit command is
``tlcli.insight.audit.audit`` (the package keeps the name ``audit`` for its module)."""

from tlcli.insight.audit import AuditResult
from tlcli.insight.evaluation import EvaluateResult, evaluate

__all__ = ["AuditResult", "EvaluateResult", "evaluate"]
