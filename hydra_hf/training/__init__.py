"""Training HYDRA with the stock `transformers.Trainer`: callbacks, schedules, optimisers and data.

```python
from hydra_hf.training import (RoutingCurriculumCallback, RoutingMetricsCallback, HealthCallback,
                               SampleGenerationCallback, BestCheckpointCallback, add_callbacks,
                               build_optimizer, build_scheduler)
```
"""

from .callbacks import (
    BestCheckpointCallback,
    HealthCallback,
    PARAMETER_GROUPS,
    LossProbe,
    RoutingCurriculumCallback,
    RoutingMetricsCallback,
    SampleGenerationCallback,
    add_callbacks,
    flatten_numbers,
    parameter_group,
)
from .progress import CompactProgressCallback, use_compact_progress
from .run_totals import RunTotalsCallback
from .optim import OPTIMIZERS, SCHEDULES, Lion, MultiOptimizer, build_optimizer, build_scheduler, param_groups

__all__ = [
    "BestCheckpointCallback",
    "CompactProgressCallback",
    "HealthCallback",
    "LossProbe",
    "RoutingCurriculumCallback",
    "RoutingMetricsCallback",
    "RunTotalsCallback",
    "SampleGenerationCallback",
    "add_callbacks",
    "flatten_numbers",
    "parameter_group",
    "PARAMETER_GROUPS",
    "OPTIMIZERS",
    "SCHEDULES",
    "Lion",
    "MultiOptimizer",
    "build_optimizer",
    "build_scheduler",
    "param_groups",
    "use_compact_progress",
]
