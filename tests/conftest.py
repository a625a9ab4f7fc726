import contextlib
import gc
import os

# XLA's backend optimisation level 0 for the test processes (and the subprocesses they
# start, which inherit XLA_FLAGS): the suite is dominated by compilation, and level 0
# compiles ~27% faster on CPU; the programs are the same HLO (sharding, memory), only
# LLVM's code generation differs. Benchmarks and users' runs keep XLA's default.
# JADEIS_TEST_XLA_DEFAULT=1 runs the suite at the default level.
if not os.environ.get("JADEIS_TEST_XLA_DEFAULT"):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax  # noqa: E402
import pytest  # noqa: E402
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


#: tests of the second CI step (``python -m pytest -n 2 -q -m slow``): end-to-end runs of
#: the docs' recipe pages and the built site, the README, the demo and CLI, multi-device
#: subprocesses, and the convergence-order fits (fitted slopes over several grids, on the
#: Gaussian oracle and the MLP). The default run (``-m "not slow"`` in pyproject.toml)
#: keeps every unit, gradient, property and compatibility test; CI runs both.
SLOW = (
    "tests/test_docs.py::test_doc_page_runs[guides/",
    # the built docs site: mkdocs build --strict, MathML, signatures, headless Chromium
    "tests/test_docs.py::test_mkdocs_build_strict",
    "tests/test_docs.py::test_site_has_mathml_and_needs_no_network",
    "tests/test_docs.py::test_every_class_has_a_constructor_signature",
    "tests/test_docs.py::test_site_in_a_browser",
    "tests/test_readme.py::",
    "tests/test_cli.py::test_train_tiny",
    "tests/test_cli.py::test_demo_writes_png_and_mmpmr_table",
    "tests/test_digits.py::test_sharded_morphs_match_one_device",
    "tests/test_digits.py::test_demo_iterations_after_the_first_do_not_compile",
    "tests/test_digits.py::test_morphing_rex_row_small",
    "tests/test_digits.py::test_morphing_pipeline_small",
    "tests/test_digits.py::test_greedy_hybrid_and_truncated_rows_small",
    "tests/test_sharding_split.py::test_every_entry_point_splits_the_batch_on_every_kind",
    "tests/test_sharding_split.py::test_every_solver_and_controller_splits_the_batch",
    "tests/test_sharding_split.py::test_two_processes_give_the_result_of_one",
    "tests/test_sharding_split.py::test_model_parallel_parameters_keep_their_sharding",
    "tests/test_sharding.py::test_sampling_with_x_T_sharded_over_four_cpu_devices",
    "tests/test_adjoint_transforms.py::test_sharded_batch_gradient",
    "tests/test_adaptive.py::test_adaptive_with_a_sharded_batch",
    "tests/test_greedy.py::test_sharded_batch_matches_one_device",
    "tests/test_user_models.py::test_conv_unet_on_an_explicit_mesh",
    "tests/test_orders_mlp.py::",
    # convergence orders as fitted slopes on the oracles
    "tests/test_samplers.py::test_measured_order",
    "tests/test_samplers.py::test_third_order_beats_second_order_full_range",
    "tests/test_unipc.py::test_measured_order",
    "tests/test_adjoint_oracle.py::test_adjoint_deis_order",
    "tests/test_adjoint_oracle.py::test_sde_adjoint_converges_to_pathwise_gradient",
    "tests/test_rex.py::test_orders_on_the_gaussian_oracle",
    "tests/test_rex.py::test_base_scheme_orders_noise_form",
    "tests/test_adaptive.py::test_fixed_grid_order_",
    "tests/test_benchmarks_gpu_quick.py::",
    "tests/test_benchmarks_peers.py::",
    "tests/test_adjoint_errors.py::test_every_solver_accepts_its_own_path[f32]",
    "tests/test_float32.py::test_every_time_grid_is_accepted_by_every_entry_point",
    "tests/test_reliability.py::test_ctrl_c_during_demo_exits_130_with_one_line",
    # the property sweep's sampling and round trips (its gradient cells stay), and
    # per-configuration equalities with Backprop beside the compatibility table's
    "tests/test_properties.py::test_sampling",
    "tests/test_properties.py::test_round_trip",
    "tests/test_rex.py::test_reversible_adjoint_equals_backprop",
    "tests/test_adaptive.py::test_adaptive_gradient_is_backprop_on_accepted_grid",
    "tests/test_truncated.py::test_inner_strategies_agree_with_backprop",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(SLOW):
            item.add_marker(pytest.mark.slow)


def _memory_maps() -> int:
    try:
        with open(f"/proc/{os.getpid()}/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return 0


def pytest_runtest_teardown(item, nextitem):
    """Free compiled programs when the test process holds more than 30,000 memory maps:
    every XLA:CPU executable maps its own code, and a test process that keeps the programs
    of its share of the suite reaches Linux's vm.max_map_count (65,530), where the next
    mmap fails and the process dies with a segmentation fault (measured: 36,892 maps after
    tests/test_rex.py and tests/test_truncated.py in one process). Not after every module:
    clearing also drops JAX's own compiled helpers, which costs ~20% of the suite's time."""
    if _memory_maps() > 30_000:
        jax.clear_caches()
        gc.collect()


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: end-to-end and multi-process tests, CI's second step (pytest -m slow)",
    )
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
