"""jadeis: gradients through diffusion sampling in JAX (AdjointDEIS and exact discrete adjoints).

Optimise what goes into a diffusion sampler (the initial noise ``x_T``, the conditioning
``z``, the model parameters, the time grid) against a loss on what comes out, ``x_0``.
The model is any function ``eps_fn(params, x, t, z) -> eps``; every entry point works
with ``jax.grad``, ``jit`` and ``vmap``.

Sampling
    ``sample``, ``sample_trajectory``: sample from ``x_T`` at ``ts[0]`` to ``x_0`` at
    ``ts[-1]`` (differentiable); ``solve`` and ``Solution``: the same, with the accepted grid
    and what the run costs (``Stats``); ``solve_adjoint`` and ``AdjointResult``: the backward
    pass for a forward pass run elsewhere.
Solvers (``solver=``)
    ``DDIM``, ``DPMSolver``, ``DPMSolverPP``, ``UniPC``, ``SinglestepDPMSolver``,
    ``SDEDPMSolver``, ``SDEDPMSolverPP``, ``Rex``, ``SDERex``; ``AbstractSolver`` is their
    base class, ``AbstractAdaptiveSolver`` (an error estimate) and ``AbstractReversibleSolver``
    (an algebraic inverse) declare capabilities. ``ClipX0`` and ``DynamicThreshold``
    (``AbstractThreshold``): clip or threshold the data prediction x_0, an option
    (``threshold=``) of the data-prediction solvers.
Step-size controllers (``controller=``)
    ``FixedGrid`` (the steps of ``ts``; default) and ``PIDController`` (adaptive steps with
    error control; ``PerExamplePIDController``: the same, on every example of a batch);
    ``Adaptive`` is a solver and a PID controller in one ``solver=`` argument;
    ``AbstractController``, ``AbstractGridController``, ``AbstractAdaptiveController``.
Gradient strategies (``adjoint=``)
    ``DiscreteAdjoint`` (default: the exact gradient of the sampler), ``AdjointDEIS`` (the
    continuous adjoint), ``ReversibleAdjoint`` (Rex: exact, memory independent of N),
    ``Backprop`` (autodiff through every step), ``Truncated`` (the last k steps only);
    ``AbstractAdjoint``.
Schedules and time grids
    ``VPLinear``, ``VPCosine``, ``DiscreteVP`` (beta tables, as in DDPM / Stable
    Diffusion), ``RectifiedFlow``, ``VE``; ``AbstractSchedule``; ``time_grid``;
    ``learn_time_grid`` and ``LearnedGrid``: optimise the grid itself.
Models and conditioning
    ``as_eps_fn`` (x0 / v / flow predictions to eps), ``PerStep`` and ``ConditioningFn``
    (conditioning that changes over the steps).
Guidance and encoding
    ``guide`` and ``GuideResult``: optimisation through the sampler; ``greedy_sample`` and
    ``GreedySolution``: greedy guidance (each step's prediction optimised for a loss on its
    one-step estimate of x_0); ``encode_ode`` (DDIM
    inversion) and ``encode_sde`` (exact Cycle-SDE encoding).

``jadeis.digits`` (the ``demo`` extra) holds the bundled 8x8-digits model and the demo.
Documentation: the ``docs/`` site (``mkdocs serve``), with guides and the mathematics.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

# The public names are imported on first use (PEP 562), so that ``import jadeis`` (and the
# ``jadeis`` command's --help) does not import JAX; static tools see the imports below.
if _TYPE_CHECKING:
    from ._adjoint import (
        AbstractAdjoint as AbstractAdjoint,
        AdjointDEIS as AdjointDEIS,
        Backprop as Backprop,
        DiscreteAdjoint as DiscreteAdjoint,
        ReversibleAdjoint as ReversibleAdjoint,
        Truncated as Truncated,
    )
    from ._conditioning import ConditioningFn as ConditioningFn, PerStep as PerStep
    from ._controller import (
        AbstractAdaptiveController as AbstractAdaptiveController,
        AbstractController as AbstractController,
        AbstractGridController as AbstractGridController,
        Adaptive as Adaptive,
        FixedGrid as FixedGrid,
        PerExamplePIDController as PerExamplePIDController,
        PIDController as PIDController,
    )
    from ._encode import encode_ode as encode_ode, encode_sde as encode_sde
    from ._grid import diffusers_timesteps as diffusers_timesteps, time_grid as time_grid
    from ._guidance import (
        AbstractLoss as AbstractLoss,
        ChiPrior as ChiPrior,
        GreedySolution as GreedySolution,
        Guidance as Guidance,
        GuideResult as GuideResult,
        GuideState as GuideState,
        IterationBar as IterationBar,
        Loss as Loss,
        NormPrior as NormPrior,
        WeightedSum as WeightedSum,
        greedy_sample as greedy_sample,
        guide as guide,
        sphere_projection as sphere_projection,
    )
    from ._learned_grid import LearnedGrid as LearnedGrid, learn_time_grid as learn_time_grid
    from ._loop import Stats as Stats
    from ._parameterisation import as_eps_fn as as_eps_fn
    from ._sample import (
        AdjointResult as AdjointResult,
        Solution as Solution,
        sample as sample,
        sample_trajectory as sample_trajectory,
        solve as solve,
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
        AbstractAdaptiveSolver as AbstractAdaptiveSolver,
        AbstractReversibleSolver as AbstractReversibleSolver,
        AbstractSolver as AbstractSolver,
        DPMSolver as DPMSolver,
        DPMSolverPP as DPMSolverPP,
        Rex as Rex,
        RexLatent as RexLatent,
        SDEDPMSolver as SDEDPMSolver,
        SDEDPMSolverPP as SDEDPMSolverPP,
        SDERex as SDERex,
        SinglestepDPMSolver as SinglestepDPMSolver,
        UniPC as UniPC,
    )
    from ._threshold import (
        AbstractThreshold as AbstractThreshold,
        ClipX0 as ClipX0,
        DynamicThreshold as DynamicThreshold,
    )


_EXPORTS = {
    "AbstractAdaptiveController": "._controller",
    "AbstractAdaptiveSolver": "._solver",
    "AbstractAdjoint": "._adjoint",
    "AbstractController": "._controller",
    "AbstractGridController": "._controller",
    "AbstractLoss": "._guidance",
    "AbstractReversibleSolver": "._solver",
    "AbstractSchedule": "._schedule",
    "AbstractSolver": "._solver",
    "AbstractThreshold": "._threshold",
    "Adaptive": "._controller",
    "AdjointDEIS": "._adjoint",
    "AdjointResult": "._sample",
    "Backprop": "._adjoint",
    "ChiPrior": "._guidance",
    "ClipX0": "._threshold",
    "ConditioningFn": "._conditioning",
    "DDIM": "._solver",
    "DPMSolver": "._solver",
    "DPMSolverPP": "._solver",
    "DiscreteAdjoint": "._adjoint",
    "DiscreteVP": "._schedule",
    "DynamicThreshold": "._threshold",
    "FixedGrid": "._controller",
    "GreedySolution": "._guidance",
    "Guidance": "._guidance",
    "GuideResult": "._guidance",
    "GuideState": "._guidance",
    "IterationBar": "._guidance",
    "LearnedGrid": "._learned_grid",
    "Loss": "._guidance",
    "NormPrior": "._guidance",
    "PIDController": "._controller",
    "PerExamplePIDController": "._controller",
    "PerStep": "._conditioning",
    "RectifiedFlow": "._schedule",
    "ReversibleAdjoint": "._adjoint",
    "Rex": "._solver",
    "RexLatent": "._solver",
    "SDEDPMSolver": "._solver",
    "SDEDPMSolverPP": "._solver",
    "SDERex": "._solver",
    "SinglestepDPMSolver": "._solver",
    "Solution": "._sample",
    "Stats": "._loop",
    "Truncated": "._adjoint",
    "UniPC": "._solver",
    "VE": "._schedule",
    "VPCosine": "._schedule",
    "VPLinear": "._schedule",
    "WeightedSum": "._guidance",
    "as_eps_fn": "._parameterisation",
    "diffusers_timesteps": "._grid",
    "encode_ode": "._encode",
    "encode_sde": "._encode",
    "greedy_sample": "._guidance",
    "guide": "._guidance",
    "learn_time_grid": "._learned_grid",
    "rescale_betas_zero_snr": "._schedule",
    "sample": "._sample",
    "sample_trajectory": "._sample",
    "solve": "._sample",
    "solve_adjoint": "._sample",
    "sphere_projection": "._guidance",
    "time_grid": "._grid",
}


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jadeis' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"

__all__ = [
    "AbstractAdaptiveController",
    "AbstractAdaptiveSolver",
    "AbstractAdjoint",
    "AbstractController",
    "AbstractGridController",
    "AbstractReversibleSolver",
    "Adaptive",
    "AbstractLoss",
    "AbstractSchedule",
    "AbstractSolver",
    "AbstractThreshold",
    "AdjointDEIS",
    "AdjointResult",
    "Backprop",
    "ChiPrior",
    "ClipX0",
    "ConditioningFn",
    "DDIM",
    "DPMSolver",
    "DPMSolverPP",
    "DiscreteAdjoint",
    "DiscreteVP",
    "DynamicThreshold",
    "FixedGrid",
    "GreedySolution",
    "Guidance",
    "GuideResult",
    "GuideState",
    "IterationBar",
    "LearnedGrid",
    "Loss",
    "NormPrior",
    "PIDController",
    "PerExamplePIDController",
    "PerStep",
    "RectifiedFlow",
    "ReversibleAdjoint",
    "Rex",
    "RexLatent",
    "SDEDPMSolver",
    "SDEDPMSolverPP",
    "SDERex",
    "SinglestepDPMSolver",
    "Solution",
    "Stats",
    "Truncated",
    "UniPC",
    "VE",
    "VPCosine",
    "VPLinear",
    "WeightedSum",
    "as_eps_fn",
    "diffusers_timesteps",
    "encode_ode",
    "encode_sde",
    "greedy_sample",
    "guide",
    "learn_time_grid",
    "rescale_betas_zero_snr",
    "sample",
    "sample_trajectory",
    "solve",
    "solve_adjoint",
    "sphere_projection",
    "time_grid",
]
