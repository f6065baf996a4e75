"""Stage kinds, one module per family; importing this package registers them all in ``STAGES``."""

from slmkit.pipeline.base import STAGES, Context, StageKind, StageResult, stage
from slmkit.pipeline.stages import candidates, collab, compress, data, measure, model, train, trust  # noqa: F401  (registration)

__all__ = ["STAGES", "Context", "StageKind", "StageResult", "stage"]
