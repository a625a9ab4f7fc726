"""The ``jadeis`` console script: ``jadeis demo`` (digit morphing) and ``jadeis train digits``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

DEMO_DESCRIPTION = """\
Morph look-alike pairs of handwritten digits with the bundled diffusion model: encode both
images, start from the spherical interpolation of their x_T and the mean of their
conditionings z, and optimise (x_T, z) through sampling so that verifier a accepts the morph
as both digits. Prints MMPMR (share of morphs accepted for both identities at 0.1% FMR) on
the three verifiers for pixel averaging, latent interpolation, AdjointDEIS-1/-2 (ODE),
AdjointDEIS-1 (SDE) and DiscreteAdjoint, and writes morphs.png and results.json to --out."""

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


def _float_pos(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from .digits._morph import METHOD_KEYS

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
        help="number of look-alike pairs of different digits to morph, closest first "
        "(1-45; default: %(default)s, one per pair of digits)",
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
        "--lr", type=_float_pos, default=0.05, help="Adam learning rate (default: %(default)s)"
    )
    demo.add_argument(
        "--methods",
        nargs="+",
        choices=METHOD_KEYS,
        default=list(METHOD_KEYS),
        metavar="M",
        help=f"methods to run (default: all of {', '.join(METHOD_KEYS)})",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the SDE paths (default: 0)")
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
    train.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
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
    train.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def _version():
    from . import __version__

    return __version__


def _writable_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".jadeis-write-test"):
            pass
    except OSError as e:
        raise CLIError(f"cannot write to --out {path!r}: {e.strerror or e}") from None
    return out


def _demo(args) -> int:
    t_start = time.perf_counter()
    out = _writable_dir(args.out)
    from .digits import load_denoiser, load_verifiers
    from .digits._data import load_split
    from .digits._morph import run_morphs, save_figure, select_pairs

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
        pairs = [tuple(args.images)]
    else:
        pairs = None
    weights = args.weights
    if weights is not None and not Path(weights).is_dir():
        raise CLIError(f"--weights: {weights!r} is not a directory.")
    denoiser = load_denoiser(weights)
    verifiers = load_verifiers(weights)
    if pairs is None:
        pairs = select_pairs(args.pairs, verifiers)
    print(
        f"jadeis demo: {len(pairs)} pair(s), N = {args.steps} steps, {args.iters} iterations "
        f"of Adam(lr={args.lr}); guide: {verifiers[0].name}; judges: "
        + ", ".join(f"{v.name} (threshold {v.threshold:.3f})" for v in verifiers),
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
    png = save_figure(report, out / "morphs.png")
    result = report.as_dict()
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    labels = ", ".join(f"{a}/{b}" for a, b in zip(report.labels_a, report.labels_b))
    print()
    print(
        f"Morphs of {len(pairs)} pair(s) of digits ({labels}); MMPMR = share of morphs "
        f"accepted with both sources at 0.1% FMR; NFE = network evaluations per morph."
    )
    print(report.table())
    print(f"\nwrote {png} and {out / 'results.json'} in {result['seconds']:.1f} s")
    return 0


def _train(args) -> int:
    out = _writable_dir(args.out)
    from .digits._train import train_all

    t0 = time.perf_counter()
    report = train_all(
        out,
        seed=args.seed,
        steps=args.steps,
        verifier_steps=args.verifier_steps,
        progress=not args.no_progress,
    )
    print(f"wrote {', '.join(report['files'])} to {out} in {time.perf_counter() - t0:.0f} s")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .digits._weights import WeightsError

    try:
        return _demo(args) if args.command == "demo" else _train(args)
    except (CLIError, WeightsError) as e:
        print(f"jadeis {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jadeis {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"jadeis {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    raise SystemExit(main())
