"""Guided generation (``guide``, ``Guidance``) and its losses, priors and projections."""

from ._greedy import GreedySolution as GreedySolution, greedy_sample as greedy_sample
from ._guide import (
    Guidance as Guidance,
    GuideResult as GuideResult,
    GuideState as GuideState,
    guide as guide,
)
from ._losses import (
    AbstractLoss as AbstractLoss,
    ChiPrior as ChiPrior,
    Loss as Loss,
    NormPrior as NormPrior,
    WeightedSum as WeightedSum,
    sphere_projection as sphere_projection,
)
from ._progress import IterationBar as IterationBar
