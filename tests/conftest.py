import contextlib

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")

# scripts that the sharding tests run in subprocesses with several host devices
collect_ignore = ["sharding_scripts"]

# hypothesis profiles: "ci" (the default: derandomised, the same examples on every run, one
# per case where a test sets no count of its own) and "thorough" for local runs:
#   python -m pytest --hypothesis-profile=thorough tests/test_properties.py
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=1, derandomize=True, **_COMMON)
settings.register_profile("thorough", max_examples=25, **_COMMON)
settings.load_profile("ci")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "float32: run the test with x64 off (JAX's default float32, what users run): "
        "jnp.asarray(0.1) is float32 and time_grid builds float32 grids",
    )


@pytest.fixture(autouse=True)
def _x64_mode(request):
    """Tests marked ``float32`` run under ``jax.enable_x64(False)``: the process-wide x64
    of this suite is off for them, exactly as for a user who never enabled it (compiled
    programs are cached per mode, so the two modes do not share or pollute each other)."""
    mode = jax.enable_x64(False) if request.node.get_closest_marker("float32") else None
    with mode if mode is not None else contextlib.nullcontext():
        yield
