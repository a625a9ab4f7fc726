from .backprop import Backprop as Backprop
from .base import AbstractAdjoint as AbstractAdjoint
from .deis import AdjointDEIS as AdjointDEIS
from .discrete import DiscreteAdjoint as DiscreteAdjoint
from .reversible import ReversibleAdjoint as ReversibleAdjoint
from .truncated import Truncated as Truncated
