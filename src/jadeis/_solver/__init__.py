from .base import (
    AbstractAdaptiveSolver as AbstractAdaptiveSolver,
    AbstractDataSolver as AbstractDataSolver,
    AbstractLinearMultistepSolver as AbstractLinearMultistepSolver,
    AbstractNoiseSolver as AbstractNoiseSolver,
    AbstractReversibleSolver as AbstractReversibleSolver,
    AbstractSolver as AbstractSolver,
    StepCoefficients as StepCoefficients,
)
from .ddim import DDIM as DDIM
from .dpm_solver import DPMSolver as DPMSolver
from .dpm_solver_pp import DPMSolverPP as DPMSolverPP
from .rex import AbstractRex as AbstractRex, Rex as Rex, RexLatent as RexLatent, SDERex as SDERex
from .sde import SDEDPMSolver as SDEDPMSolver, SDEDPMSolverPP as SDEDPMSolverPP
from .singlestep import SinglestepDPMSolver as SinglestepDPMSolver
from .unipc import UniPC as UniPC
