"""The digits setting: a bundled conditional diffusion model of the 8x8 handwritten digits
(shipped with the package), three verifier networks standing in for face recognition, and the
morphing pipeline.

It needs the ``demo`` extra (flax, matplotlib): ``pip install '.[demo]'``.
It uses only jadeis' public API.
"""


def _check_dependencies():
    import importlib.util
    import sys

    missing = []
    for module, package in (
        ("flax", "flax"),
        ("matplotlib", "matplotlib"),
    ):
        if module in sys.modules:
            found = sys.modules[module] is not None
        else:
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
        if not found:
            missing.append(package)
    if missing:
        raise MissingDependencyError(
            f"jadeis.digits (the demo and `jadeis train digits`) needs {', '.join(missing)}, "
            f"which {'is' if len(missing) == 1 else 'are'} not installed: "
            f"pip install '.[demo]' in a checkout of jadeis"
        )


class MissingDependencyError(ImportError):
    """An optional dependency of the demo (the ``demo`` extra) is not installed."""


_check_dependencies()

from ._data import load_split as load_split  # noqa: E402
from ._files import (  # noqa: E402
    OutputDirError as OutputDirError,
    check_writable as check_writable,
    is_package_weights_dir as is_package_weights_dir,
    package_weights_dir as package_weights_dir,
    write_files as write_files,
)
from ._models import (  # noqa: E402
    Denoiser as Denoiser,
    Verifier as Verifier,
    load_denoiser as load_denoiser,
    load_verifiers as load_verifiers,
)
from ._morph import (  # noqa: E402
    METHOD_KEYS as METHOD_KEYS,
    MorphReport as MorphReport,
    candidate_pairs as candidate_pairs,
    identity_loss as identity_loss,
    ranked_pairs as ranked_pairs,
    run_morphs as run_morphs,
    save_figure as save_figure,
    save_quality_plot as save_quality_plot,
    select_pairs as select_pairs,
    shard_batch as shard_batch,
    slerp as slerp,
    spread_ranks as spread_ranks,
    verdicts as verdicts,
)
from ._train import check_train_out as check_train_out, train_all as train_all  # noqa: E402
from ._weights import (  # noqa: E402
    WeightsError as WeightsError,
    default_weights_dir as default_weights_dir,
)
