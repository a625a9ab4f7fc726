from .adaptive import Adaptive as Adaptive
from .base import (
    AbstractAdaptiveController as AbstractAdaptiveController,
    AbstractController as AbstractController,
    AbstractGridController as AbstractGridController,
)
from .fixed import FixedGrid as FixedGrid
from .per_example import PerExamplePIDController as PerExamplePIDController
from .pid import PIDController as PIDController
