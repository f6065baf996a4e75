"""Trust audit of a (small) language model on five dimensions: robustness, privacy, reliability, safety, fairness.

``audit(backend, AuditConfig(...))`` runs the selected dimensions against any
:class:`~slmkit.backends.Backend`; ``write_report`` writes report.json and a
self-contained report.html; ``compare`` tests the differences between two audits.
"""

from slmkit.trust.common import Example, GroupResult, Metric
from slmkit.trust.suite import (DIMENSION_NAMES, DIMENSIONS, AuditConfig, AuditContext, AuditResult, Difference, audit,
                                compare, parse_dimensions)

__all__ = [
    "DIMENSIONS",
    "DIMENSION_NAMES",
    "AuditConfig",
    "AuditContext",
    "AuditResult",
    "Difference",
    "Example",
    "GroupResult",
    "Metric",
    "audit",
    "compare",
    "parse_dimensions",
]
