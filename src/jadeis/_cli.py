"""The ``jadeis`` console script: ``jadeis demo`` (digit morphing) and ``jadeis train digits``.

This module and its parser import only the standard library: NumPy, flax and ``jadeis.digits``
are imported once a command runs, not for ``--help`` or a usage error. (Python imports the
``jadeis`` package first, and that still imports JAX.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

# the keys of jadeis.digits.METHODS, in its order (a test keeps the two equal); written out here
# so that building the parser does not import the demo
DEMO_METHODS = (
    "pixel",
    "latent",
    "greedy",
    "adjointdeis1_ode",
    "adjointdeis2_ode",
    "adjointdeis1_sde",
    "discrete",
    "hybrid",
    "truncated",
    "rex",
)

DEMO_DESCRIPTION = """\
Morph look-alike pairs of handwritten digits with the bundled diffusion model: encode both
images, start from the spherical interpolation of their x_T and the mean of their
conditionings z, and optimise (x_T, z) through sampling so that verifier a accepts the morph
as both digits. Prints MMPMR (share of morphs accepted for both identities at 0.1% FMR) on
the three verifiers, beside each verifier's ceiling, for pixel averaging, latent
interpolation, Greedy-DiM* (greedy guidance of each step's noise prediction),
AdjointDEIS-1/-2 (ODE), AdjointDEIS-1 (SDE), DiscreteAdjoint, DiscreteAdjoint with a greedy
final sample, Truncated (the last N/2 steps differentiated) and Rex (exact Rex encoding,
ReversibleAdjoint gradients), with the NFE (diffusion-model evaluations and VJPs) and the
loss network's evaluations and VJPs of each, and writes morphs.png, quality.png (MMPMR per
NFE) and results.json to --out."""

TRAIN_DESCRIPTION = """\
Train the bundled digits models from a seed: the conditional diffusion model and the three
verifiers (thresholds at 0.1% FMR on the validation split). Writes the msgpack weights,
manifest.json, training_loss.png and samples.png to --out. Use the result with
`jadeis demo --weights DIR` (or JADEIS_DIGITS_WEIGHTS=DIR)."""


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _positive(name, lo=1, hi=None):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            raise argparse.ArgumentTypeError(f"{name} must be {rng}, got {v}")
        return v

    return parse


SEED_MAX = 2**32 - 1
LR_MAX = 1.0


def _lr(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lr must be a number, got {text!r}") from None
    if not (math.isfinite(v) and 0 < v <= LR_MAX):
        raise argparse.ArgumentTypeError(
            f"--lr must be a finite number in (0, {LR_MAX:g}] (Adam's step size; the default "
            f"is 0.05), got {text}"
        )
    return v


def _seed(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed must be an integer, got {text!r}") from None
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(
            f"--seed must be between 0 and 2**32 - 1 = {SEED_MAX}, got {text}"
        )
    return v


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jadeis",
        description="jadeis: gradients through diffusion sampling in JAX (AdjointDEIS).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,train}", parser_class=_Parser)
    sub.required = True

    demo = sub.add_parser(
        "demo",
        help="morph digits with the bundled models and report MMPMR",
        description=DEMO_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--out", default="jadeis-demo", help="output directory (default: %(default)s)"
    )
    demo.add_argument(
        "--pairs",
        type=_positive("--pairs", 1, 45),
        default=45,
        help="number of look-alike pairs of different digits to morph, spread from the closest "
        "to the farthest of the 45 (1-45; default: %(default)s, one per pair of digits)",
    )
    demo.add_argument(
        "--images",
        type=int,
        nargs=2,
        metavar=("A", "B"),
        help="morph this one pair instead: two indices into the test split (0-299)",
    )
    demo.add_argument(
        "--steps",
        type=_positive("--steps", 2, 1000),
        default=20,
        help="sampling steps N (default: %(default)s)",
    )
    demo.add_argument(
        "--iters",
        type=_positive("--iters", 0, 10000),
        default=30,
        help="optimisation iterations (default: %(default)s)",
    )
    demo.add_argument(
        "--lr",
        type=_lr,
        default=0.05,
        help=f"Adam learning rate in (0, {LR_MAX:g}] (default: %(default)s)",
    )
    demo.add_argument(
        "--methods",
        nargs="+",
        choices=DEMO_METHODS,
        default=list(DEMO_METHODS),
        metavar="M",
        help=f"methods to run (default: all of {', '.join(DEMO_METHODS)})",
    )
    demo.add_argument(
        "--seed", type=_seed, default=0, help="seed of the SDE paths (0 to 2**32-1; default: 0)"
    )
    demo.add_argument("--weights", help="directory of weights (default: the bundled ones)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    train = sub.add_parser(
        "train",
        help="train the bundled models (jadeis train digits)",
        description=TRAIN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("what", choices=["digits"], help="what to train (digits)")
    train.add_argument(
        "--out", default="jadeis-digits", help="output directory (default: %(default)s)"
    )
    train.add_argument(
        "--seed", type=_seed, default=0, help="random seed (0 to 2**32-1; default: %(default)s)"
    )
    train.add_argument(
        "--steps",
        type=_positive("--steps", 100),
        default=6000,
        help="diffusion-model optimiser steps (default: %(default)s)",
    )
    train.add_argument(
        "--verifier-steps",
        type=_positive("--verifier-steps", 100),
        default=2000,
        help="optimiser steps per verifier (default: %(default)s)",
    )
    train.add_argument(
        "--force",
        action="store_true",
        help="allow --out to be the installed package's own weights folder (replaces the "
        "bundled weights)",
    )
    train.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def _version():
    from . import __version__

    return __version__


def _demo(args) -> int:
    t_start = time.perf_counter()
    from .digits import OutputDirError

    # validate everything before any work: first the output folder (created and written to as
    # a probe, then removed), so that a run cannot end in a folder it cannot write
    out = Path(args.out)
    _check_out(out, OutputDirError)
    import numpy as np

    from .digits import (
        load_denoiser,
        load_split,
        load_verifiers,
        ranked_pairs,
        run_morphs,
        save_figure,
        save_quality_plot,
        spread_ranks,
        verdicts,
        write_files,
    )

    if args.images is not None:
        n_test = len(load_split("test")[1])
        for i in args.images:
            if not 0 <= i < n_test:
                raise CLIError(
                    f"--images: index {i} is out of range (the test split has "
                    f"{n_test} images: 0-{n_test - 1})."
                )
        if args.images[0] == args.images[1]:
            raise CLIError("--images: give two different images.")
    weights = args.weights
    if weights is not None and not Path(weights).is_dir():
        raise CLIError(f"--weights: {weights!r} is not a directory.")
    denoiser = load_denoiser(weights)
    verifiers = load_verifiers(weights)
    if args.images is not None:
        pairs, ranks = [tuple(args.images)], None
        selection = "the pair given by --images"
    else:
        ranked = ranked_pairs(verifiers)
        ranks = spread_ranks(args.pairs, len(ranked))
        pairs = [ranked[r][1:] for r in ranks]
        dist = [ranked[r][0] for r in ranks]
        spread = "" if len(pairs) == len(ranked) else ", spread over the difficulty range"
        selection = (
            f"{len(pairs)} of the {len(ranked)} look-alike pairs{spread} (pixel distance "
            f"{min(dist):.1f}-{max(dist):.1f})"
        )
    outputs = ("morphs.png", "quality.png", "results.json")
    existing = [name for name in outputs if (out / name).exists()]
    print(
        f"jadeis demo: {len(pairs)} pair(s), N = {args.steps} steps, {args.iters} iterations "
        f"of Adam(lr={args.lr}); guide: {verifiers[0].name}; judges: "
        + ", ".join(f"{v.name} (threshold {v.threshold:.3f})" for v in verifiers),
        flush=True,
    )
    print(f"pairs: {selection}", flush=True)
    if existing:
        print(
            f"--out {out}: {' and '.join(existing)} from an earlier run will be replaced when "
            f"this run completes",
            flush=True,
        )
    report = run_morphs(
        denoiser,
        verifiers,
        pairs,
        steps=args.steps,
        iters=args.iters,
        lr=args.lr,
        methods=args.methods,
        seed=args.seed,
        progress=not args.no_progress,
    )
    for r in report.results:
        if r.losses is not None and not np.all(np.isfinite(r.losses)):
            it = int(np.argmax(~np.all(np.isfinite(r.losses), axis=1)))
            raise CLIError(
                f"{r.method.label}: the identity loss became non-finite at iteration {it}; "
                f"nothing was written. Try a smaller --lr."
            )
        if not np.all(np.isfinite(r.morphs)):
            raise CLIError(f"{r.method.label}: non-finite morphs; nothing was written.")
    result = report.as_dict()
    result["pair_selection"] = selection
    if ranks is not None:  # each pair's rank among the look-alike pairs, 1 = closest
        result["pair_ranks"] = [r + 1 for r in ranks]
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    replaced = write_files(
        out,
        {
            "morphs.png": lambda p: save_figure(report, p),
            "quality.png": lambda p: save_quality_plot(report, p),
            "results.json": lambda p: p.write_text(json.dumps(result, indent=2) + "\n"),
        },
    )
    labels = ", ".join(f"{a}/{b}" for a, b in zip(report.labels_a, report.labels_b))
    print()
    print(
        f"Morphs of {len(pairs)} pair(s) of digits ({labels}); MMPMR = share of morphs "
        f"accepted with both sources at 0.1% FMR (in brackets: how many); ceiling = pairs "
        f"whose embedding bisector clears the threshold; NFE = diffusion-model evaluations "
        f"per morph (a VJP counts one); loss net = the loss network's evaluations + VJPs."
    )
    print(report.table())
    last = report.results[-1] if report.results else None
    if last is not None and len(pairs) <= 6:
        print(
            f"\nverdicts of {last.method.label} per pair (✓: accepted with both sources): "
            + "; ".join(
                f"{a}/{b}: {verdicts(last.accepted[:, i])}"
                for i, (a, b) in enumerate(zip(report.labels_a, report.labels_b))
            )
        )
    wrote = f"{out / 'morphs.png'}, {out / 'quality.png'} and {out / 'results.json'}"
    print(f"\nwrote {wrote} in {result['seconds']:.1f} s")
    if replaced:
        print(f"(overwrote {', '.join(str(p) for p in replaced)} from an earlier run)")
    return 0


def _check_out(out, error_type):
    from .digits import check_writable

    try:
        check_writable(out)
    except error_type as e:
        raise CLIError(f"--out: {e}") from None


def _train(args) -> int:
    from .digits import OutputDirError, check_train_out, train_all

    try:
        out = check_train_out(args.out, force=args.force)
    except OutputDirError as e:
        raise CLIError(f"--out: {e}") from None
    t0 = time.perf_counter()
    report = train_all(
        out,
        seed=args.seed,
        steps=args.steps,
        verifier_steps=args.verifier_steps,
        progress=not args.no_progress,
        force=args.force,
    )
    print(
        f"wrote {', '.join(report['files'])} to {out} in {time.perf_counter() - t0:.0f} s"
        + (" (replacing the folder's previous contents)" if report.get("replaced") else "")
    )
    return 0


def main(argv=None) -> int:
    """The console script. Exit status: 0 success, 1 failure, 2 usage error, 130 Ctrl-C.

    Run as a script (``argv`` None), an interrupt ends the process at once with status 130
    after one line on stderr (``os._exit``: no interpreter teardown while JAX's threads are
    busy, which could crash); temporary files are removed before that."""
    script = argv is None
    command = "jadeis"
    try:
        args = build_parser().parse_args(argv)
        command = f"jadeis {args.command}"
        try:
            from .digits import OutputDirError, WeightsError
        except ImportError as e:  # the demo extra is missing
            print(f"{command}: error: {e}", file=sys.stderr)
            return 1

        try:
            return _demo(args) if args.command == "demo" else _train(args)
        except (CLIError, WeightsError, OutputDirError) as e:
            print(f"{command}: error: {e}", file=sys.stderr)
            return 2
        except (OSError, FloatingPointError) as e:
            print(f"{command}: error: {e}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C: no traceback either
        print(
            f"\n{command}: interrupted (Ctrl-C); no output was written or replaced.",
            file=sys.stderr,
        )
        if script:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    raise SystemExit(main())
