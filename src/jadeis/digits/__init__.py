"""The digits setting: a bundled conditional diffusion model of scikit-learn's 8x8 digits,
three verifier networks standing in for face recognition, and the morphing pipeline."""

from ._data import load_split as load_split
from ._models import (
    Denoiser as Denoiser,
    Verifier as Verifier,
    load_denoiser as load_denoiser,
    load_verifiers as load_verifiers,
)
from ._morph import (
    METHOD_KEYS as METHOD_KEYS,
    MorphReport as MorphReport,
    candidate_pairs as candidate_pairs,
    identity_loss as identity_loss,
    run_morphs as run_morphs,
    save_figure as save_figure,
    select_pairs as select_pairs,
    shard_batch as shard_batch,
    slerp as slerp,
)
from ._weights import WeightsError as WeightsError, default_weights_dir as default_weights_dir
