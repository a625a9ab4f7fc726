"""jadeis: gradients through diffusion sampling in JAX (AdjointDEIS and exact discrete adjoints)."""

from ._adjoint import (
    AbstractAdjoint as AbstractAdjoint,
    AdjointDEIS as AdjointDEIS,
    Backprop as Backprop,
    DiscreteAdjoint as DiscreteAdjoint,
    ReversibleAdjoint as ReversibleAdjoint,
)
from ._conditioning import ConditioningFn as ConditioningFn, PerStep as PerStep
from ._encode import encode_ode as encode_ode, encode_sde as encode_sde
from ._grid import diffusers_timesteps as diffusers_timesteps, time_grid as time_grid
from ._guidance import (
    AbstractLoss as AbstractLoss,
    ChiPrior as ChiPrior,
    Guidance as Guidance,
    GuideResult as GuideResult,
    GuideState as GuideState,
    Loss as Loss,
    NormPrior as NormPrior,
    WeightedSum as WeightedSum,
    guide as guide,
    sphere_projection as sphere_projection,
)
from ._learned_grid import LearnedGrid as LearnedGrid, learn_time_grid as learn_time_grid
from ._parameterisation import as_eps_fn as as_eps_fn
from ._sample import (
    AdjointResult as AdjointResult,
    sample as sample,
    sample_trajectory as sample_trajectory,
    solve_adjoint as solve_adjoint,
)
from ._schedule import (
    VE as VE,
    AbstractSchedule as AbstractSchedule,
    DiscreteVP as DiscreteVP,
    RectifiedFlow as RectifiedFlow,
    VPCosine as VPCosine,
    VPLinear as VPLinear,
    rescale_betas_zero_snr as rescale_betas_zero_snr,
)
from ._solver import (
    DDIM as DDIM,
    AbstractSolver as AbstractSolver,
    DPMSolver as DPMSolver,
    DPMSolverPP as DPMSolverPP,
    Rex as Rex,
    RexLatent as RexLatent,
    SDEDPMSolver as SDEDPMSolver,
    SDEDPMSolverPP as SDEDPMSolverPP,
    SDERex as SDERex,
    UniPC as UniPC,
)

__version__ = "0.1.0"
