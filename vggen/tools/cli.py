"""The ``vggen`` command line.

Every user-facing failure is a VggenError, printed as one line on stderr with
a non-zero exit; no traceback reaches the user.  A command's result (a table,
JSON, the file it wrote) is on stdout; progress and information are logged
to stderr (``-q``, ``-v``: :mod:`vggen.tools.progress`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from vggen import __version__
from vggen.atomic import check_writable
from vggen.errors import VggenError
from vggen.paths import cache_dir, generated_dir, templates_dir
from vggen.tools.progress import configure_logging, progress_bars_enabled, verbosity_level

log = logging.getLogger(__name__)


def _cmd_check(args) -> int:
    if args.layers == "zoo":
        return _check_zoo(args)
    from vggen.proof.syncbn import sync_batch_normalization_rows
    from vggen.proof.verify import check_all
    from vggen.proof.winograd import winograd_rows
    from vggen.tools.report import write_markdown

    if args.markdown:
        check_writable(args.markdown, "--markdown ")
    # the document's equations, then --sync-bn's split BatchNormalization proved
    # equal to eqs. 19–20, 24–25 and 50 over the global batch
    rows = check_all() + sync_batch_normalization_rows()
    if args.markdown:
        write_markdown(args.markdown, rows)
    rows += winograd_rows()      # the fast algorithms' forms, proved exactly (no finite differences)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2, ensure_ascii=False))
    else:
        header = ("layer", "gradient", "eq.", "method", "verdict", "finite diff.", "detail")
        table = [(r.layer, r.gradient, r.equation or "—", r.method, r.verdict,
                  f"{r.fd_error:.1e}" if r.fd_error is not None else "—", r.detail) for r in rows]
        widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
        for line in [header] + table:
            print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())
        failed = sum(r.verdict != "pass" for r in rows)
        print(f"\n{len(rows) - failed} passed, {failed} failed")
    return 1 if any(r.verdict != "pass" for r in rows) else 0


def _check_zoo(args) -> int:
    """The zoo's layers derived and checked: one row per layer (no document to prove against)."""
    from vggen.proof.zoo_check import check_zoo, format_rows

    if args.markdown:
        raise VggenError("--markdown writes the document's derivations: it goes with --layers vgg, not zoo")
    rows = check_zoo()
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2, ensure_ascii=False))
    else:
        sys.stdout.write(format_rows(rows))
    return 1 if any(r.verdict != "pass" for r in rows) else 0


def _cmd_build(args) -> int:
    from vggen.compiler.emit import build

    out = args.out or os.environ.get("VGGEN_GENERATED") or "generated"
    if args.check:
        stale = build(out, check=True)
        if stale:
            print("generated/ is stale; run `vggen build`:", file=sys.stderr)
            for path in stale:
                print(f"  {path}", file=sys.stderr)
            return 1
        print("generated/ is up to date")
        return 0
    written = build(out)
    print(f"wrote {len(written)} files under {out}/")
    return 0


def _cmd_train(args) -> int:
    from vggen.distributed.failure import run_ranks
    from vggen.tools.train import TrainConfig, train

    config = TrainConfig(**{k: v for k, v in vars(args).items()
                            if k in TrainConfig.__dataclass_fields__})
    # one process, or one rank of `mpiexec -n N vggen train` (vggen.distributed)
    run_ranks(lambda comm: train(config, given=args.given, comm=comm))
    return 0


def _cmd_bench(args) -> int:
    if args.layer:
        from vggen.tools.layer_bench import format_scaling, layer_scaling

        target = "c" if args.target == "auto" else args.target
        print(format_scaling(args.layer, layer_scaling(args.layer, target)))
        return 0
    from vggen.tools.bench import bench, format_table

    result = bench(args.target, args.batch_size, args.width, args.steps, args.warmup, args.seed,
                   torch=not args.no_torch, fuse=args.fuse, graph=args.cuda_graph,
                   allow_modified_kernels=args.allow_modified_kernels, model=args.model,
                   precision=args.precision, conv_algorithm=args.conv_algorithm)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(format_table(result))
    return 0


def _cmd_tune(args) -> int:
    from vggen.runtime import cuda_available, resolve_target

    target = resolve_target(args.target)
    if target == "c":
        return _tune_c(args)
    if target != "cuda":
        raise VggenError("vggen tune times generated kernels: use --target c or cuda")
    from vggen.tools.tune import tune

    if not cuda_available():
        raise VggenError("vggen tune --target cuda times the CUDA kernels: it needs CuPy and a GPU")
    path, record, summary = tune(args.batch_size, args.width, args.generated)
    model = sum(m for m, _ in summary.values())
    best = sum(b for _, b in summary.values())
    kept = sum(len(v) for v in record.kernels.values())
    print(f"wrote {path} ({kept} measured choices, {record.device}) and rebuilt the kernels; "
          f"the {len(summary)} products take {best:.2f} ms with them, {model:.2f} ms with the model's choices")
    # then the convolutions' algorithms, with the tiles just chosen
    return _tune_algorithms(args, "cuda")


def _tune_c(args) -> int:
    return _tune_algorithms(args, "c")


def _tune_algorithms(args, target: str) -> int:
    from vggen.tools.tune_algorithms import format_table, tune

    path, record, summary = tune(args.batch_size, args.width, args.generated, target=target)
    direct = sum(d for d, _ in summary.values())
    best = sum(b for _, b in summary.values())
    print(f"wrote {path} ({sum(len(v) for v in record['kernels'].values())} measured choices, "
          f"{record['device']}) and rebuilt the kernels; the {len(summary)} convolution kernels take "
          f"{best:.1f} ms with the fastest algorithms, {direct:.1f} ms direct")
    print(format_table(record))
    return 0


def _cmd_data(args) -> int:
    from vggen.data.datasets import default_data_dir, fetch_cifar10

    path = fetch_cifar10(default_data_dir(args.data), progress=progress_bars_enabled())
    print(f"CIFAR-10 is in {path}")
    return 0


def _cmd_cache(args) -> int:
    from vggen.tools.cache import clear_cache

    if args.action == "path":
        print(cache_dir())
    else:
        print(clear_cache().summary())
    return 0


def _cmd_report(args) -> int:
    from vggen.compiler.emit import generated_layers
    from vggen.tools.inspect import find_layer
    from vggen.tools.report import report

    out = check_writable(args.output or ("derivations.html" if args.html else "derivations.md"), "-o ")
    layers = [find_layer(name) for name in args.layer] if args.layer else generated_layers()
    layers = list({layer.name: layer for layer in layers}.values())
    path, rows = report(out, layers, args.generated, as_html=args.html)
    failed = [r for r in rows if r.verdict != "pass"]
    print(f"wrote {path}: {len(layers)} layers, {len(rows)} checks, "
          f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    for r in failed:
        print(f"  failed: {r.layer} {r.gradient}"
              + (f" (eq. {r.equation})" if r.equation else "") + f": {r.detail}", file=sys.stderr)
    return 1 if failed else 0


def _cmd_inspect(args) -> int:
    from vggen.tools.inspect import inspect_layer

    sys.stdout.write(inspect_layer(args.layer, args.target, args.generated))
    return 0


def _cmd_plot(args) -> int:
    from vggen.tools.plot import plot

    check_writable(args.output, "-o ")
    path = plot(args.metrics, args.output, args.title)
    print(f"wrote {path}")
    return 0


def _generated_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generated", metavar="DIR",
                   help="directory holding manifest.json (default: ./generated if it has one, "
                        "else the repository's generated/)")


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line too (``--help`` still shows the usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _verbosity_options(p: argparse.ArgumentParser, default) -> None:
    p.add_argument("-q", "--quiet", action="count", default=default,
                   help="less on stderr: warnings and errors only (no progress bars)")
    p.add_argument("-v", "--verbose", action="count", default=default,
                   help="more on stderr: debug detail")


class _CommandParser(_Parser):
    """A subcommand's parser (nested ones too: their parsers are of this class).
    It takes -q/-v after the command as well, setting them only when given, so
    that they do not undo the ones given before the command."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _verbosity_options(self, default=argparse.SUPPRESS)


def _network_options(p: argparse.ArgumentParser) -> None:
    """The network and step options ``train`` and ``bench`` share."""
    p.add_argument("--model", default="vgg", metavar="NAME|FILE",
                   help="the network: vgg (the default, shared/vgg-network.md), vgg11, vgg13, vgg16, "
                        "vgg19, or a model file (one entry per line: block M, conv M, bn, relu, "
                        "dropout P, pool, linear M|classes, loss, and layer FILE.py:FUNCTION "
                        "[NAME=VALUE ...] for a layer of one's own)")
    p.add_argument("--width", type=int, default=64, help="channels of the first stage, C1 (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None,
                   help="run BatchNormalization → ReLU (→ Dropout) as one composed layer "
                        "(default: on, but off on the c target, where it is slower)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="cuda: replay each training step as captured CUDA graphs")
    p.add_argument("--allow-modified-kernels", action="store_true",
                   help="run generated sources that differ from generated/manifest.json "
                        "(hand edits); without it they are refused")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="c: bf16 multiplies the convolutions' and Linear layers' operands in bf16 "
                        "(AMX or AVX-512 BF16, fp32 sums; weights and optimizer stay fp32); bench "
                        "then times PyTorch under bf16 autocast (default: fp32)")
    p.add_argument("--conv-algorithm", choices=("auto", "direct", "winograd2", "winograd4"), default="auto",
                   help="how the 3×3 convolutions run: direct, or Winograd F(2×2, 3×3) / F(4×4, 3×3); "
                        "auto (the default) takes what `vggen tune` measured on this device, else (c) a cost "
                        "model's choice or (cuda) direct, per layer")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vggen")
    p.add_argument("--version", action="version", version=f"vggen {__version__}")
    _verbosity_options(p, default=0)
    p.description = ("vggen: VGG layers written once as SymPy equations; backward derived and "
                     "proved; C (OpenMP) and CUDA kernels generated; the network trained with them.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser)

    c = sub.add_parser("check", help="derive every backward and prove it against the document")
    c.add_argument("--layers", choices=["vgg", "zoo"], default="vgg",
                   help="vgg (default): VGG's layers, each derived gradient proved against the document's "
                        "equation and checked numerically; zoo: the layers of vggen/frontend/zoo.py, each "
                        "derived and checked by finite differences, one row per layer")
    c.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    c.add_argument("--markdown", metavar="FILE",
                   help="also write the derivations as Markdown (LaTeX math; --layers vgg only)")
    c.set_defaults(func=_cmd_check)

    b = sub.add_parser("build", help="regenerate the C and CUDA kernels into generated/")
    b.add_argument("--check", action="store_true", help="write nothing; exit 1 if generated/ is stale")
    b.add_argument("--out", metavar="DIR",
                   help="output directory (default: $VGGEN_GENERATED, else ./generated)")
    b.set_defaults(func=_cmd_build)

    t = sub.add_parser("train", help="train the generated VGG")
    t.add_argument("--target", default="auto", choices=["auto", "c", "cuda", "numpy"],
                   help="kernel backend (default: auto = cuda if a GPU and CuPy are present, else c)")
    t.add_argument("--dataset", default="digits", choices=["digits", "cifar10"],
                   help="digits: scikit-learn's bundled digits at 32×32×3, no download (default)")
    t.add_argument("--data", metavar="DIR", help="CIFAR-10 directory (default: $VGGEN_DATA or the cache)")
    t.add_argument("--epochs", type=int, default=10,
                   help="train until this epoch (default: 10; resuming: the checkpoint's)")
    t.add_argument("--schedule-epochs", type=int, metavar="N",
                   help="length of the cosine learning-rate schedule in epochs (default: --epochs; "
                        "resuming: the checkpoint's). Set it beyond --epochs for a run "
                        "you will extend with --resume")
    t.add_argument("--batch-size", type=int, default=32, help="mini-batch size (default: 32)")
    t.add_argument("--lr", type=float, default=0.01,
                   help="initial learning rate, cosine-annealed to 0 (default: 0.01)")
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    t.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay (default: 5e-4)")
    _network_options(t)
    t.add_argument("--metrics", metavar="FILE",
                   help="write one JSON line per epoch (resuming: the checkpoint's file, continued)")
    t.add_argument("--checkpoint", metavar="DIR",
                   help="write a checkpoint after every epoch (resuming: where it resumed from)")
    t.add_argument("--resume", metavar="CHECKPOINT",
                   help="continue a run from its checkpoint (the .npz, or its directory); its "
                        "options are the run's: repeat them or leave them out")
    t.add_argument("--dropout", dest="dropout", action=argparse.BooleanOptionalAction, default=None,
                   help="dropout with the network's ratios (default: on for cifar10, off for digits)")
    t.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no random crops or flips")
    t.add_argument("--accumulate", type=int, default=1, metavar="K",
                   help="add the gradients of K micro-batches of --batch-size per step (per rank): "
                        "one process with --accumulate N runs the steps of N ranks (default: 1)")
    t.add_argument("--sync-bn", action="store_true",
                   help="under mpiexec: BatchNormalization with the global batch's statistics and "
                        "∂L/∂γ, ∂L/∂β (default: each rank's own, as DistributedDataParallel)")
    t.add_argument("--check-every", type=int, default=100, metavar="STEPS",
                   help="under mpiexec: compare the ranks' parameters every STEPS steps, and after "
                        "every epoch (default: 100)")
    t.set_defaults(func=_cmd_train)

    r = sub.add_parser("report", help="write the derivation document (Math for VGG, regenerated)",
                       description="Check every layer and write the derivation document: per layer the "
                       "forward equations and their kernels; per gradient the document's equation, the "
                       "derived one, the verdict and method of the proof, and the kernels that compute it "
                       "(from generated/manifest.json).  Markdown with LaTeX math, written atomically.  "
                       "Exit status 1 if a check fails (the document is written all the same).")
    r.add_argument("-o", "--output", metavar="FILE",
                   help="where to write (default: derivations.md, or derivations.html with --html)")
    r.add_argument("--html", action="store_true",
                   help="write a standalone HTML page instead, its math in MathML (no script, no network)")
    r.add_argument("--layer", action="append", metavar="NAME",
                   help="only this layer (named as for `vggen inspect`); repeat for more "
                        "(default: every layer vggen generates kernels for)")
    _generated_option(r)
    r.set_defaults(func=_cmd_report)

    i = sub.add_parser("inspect", help="show a layer's equations and its generated kernels",
                       description="Print a layer's forward equations, its derived backward equations "
                       "and the source of its generated kernels for one target, read from generated/ "
                       "(checked against the manifest's hashes).")
    i.add_argument("layer", metavar="LAYER",
                   help="the layer: case-insensitive; an unambiguous prefix or part of the name "
                        "is enough (conv, linear, dropout, batchnorm, relu, pool, softmax)")
    i.add_argument("--target", default="c", choices=["c", "cuda"],
                   help="whose kernels to show: c (OpenMP, default) or cuda")
    _generated_option(i)
    i.set_defaults(func=_cmd_inspect)

    pl = sub.add_parser("plot", help="plot loss and accuracy per epoch from a metrics file",
                        description="Draw training curves (loss and accuracy per epoch, train and test) "
                        "from the JSON-lines file `vggen train --metrics` writes, as a PNG, written "
                        "atomically.  Needs matplotlib: pip install 'vggen[plot]'.")
    pl.add_argument("metrics", metavar="METRICS.jsonl",
                    help="metrics file: one JSON object per epoch (epoch, train_loss, train_acc, "
                         "test_loss, test_acc, images_per_s, seconds)")
    pl.add_argument("-o", "--output", metavar="FILE", default="curves.png",
                    help="PNG to write (default: curves.png)")
    pl.add_argument("--title", metavar="TEXT",
                    help="title above the plots (default: the metrics file's name)")
    pl.set_defaults(func=_cmd_plot)

    m = sub.add_parser("bench", help="images/s of a training step, beside PyTorch")
    m.add_argument("--target", default="auto", choices=["auto", "c", "cuda"],
                   help="kernel backend (default: auto = cuda if a GPU and CuPy are present, else c)")
    m.add_argument("--batch-size", type=int, default=64, help="images per step (default: 64)")
    _network_options(m)
    m.add_argument("--steps", type=int, default=20, help="timed steps; the median is reported (default: 20)")
    m.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    m.add_argument("--no-torch", action="store_true", help="skip the PyTorch side")
    m.add_argument("--json", action="store_true",
                   help="print one JSON object (images_per_s, torch_images_per_s, ratio, kernels)")
    m.add_argument("--layer", metavar="NAME",
                   help="instead: time one zoo layer's forward and backward at doubling sizes "
                        "(e.g. sample_norm: whether its backward's work is linear)")
    m.set_defaults(func=_cmd_bench)

    u = sub.add_parser("tune", help="time the kernels' schedules (cuda) and algorithms; record the fastest",
                       description="cuda: replay every tiled product of a training step under each "
                                   "candidate tile configuration and split count, record the fastest in "
                                   "generated/tuning.json.  Then, c and cuda: replay every 3×3 convolution "
                                   "kernel under each algorithm (direct, Winograd F(2×2, 3×3), F(4×4, 3×3)), "
                                   "record the fastest in generated/algorithms.json (c) or "
                                   "algorithms-cuda.json (cuda).  Then rebuild the kernels "
                                   "(the manifest lists the records).")
    u.add_argument("--target", choices=("auto", "c", "cuda"), default="auto",
                   help="kernel backend (default: auto = cuda if a GPU and CuPy are present, else c)")
    u.add_argument("--batch-size", type=int, nargs="+", default=[64], metavar="N",
                   help="batch sizes whose products to tune (default: 64)")
    u.add_argument("--width", type=int, default=64, help="channels of the first stage, C1 (default: 64)")
    _generated_option(u)
    u.set_defaults(func=_cmd_tune)

    d = sub.add_parser("data", help="datasets")
    dsub = d.add_subparsers(dest="action", required=True, metavar="ACTION")
    f = dsub.add_parser("fetch", help="download a dataset and verify its checksum")
    f.add_argument("name", choices=["cifar10"])
    f.add_argument("--data", metavar="DIR", help="destination (default: $VGGEN_DATA or the cache)")
    f.set_defaults(func=_cmd_data)

    k = sub.add_parser("cache", help="where compiled kernel libraries are kept; clear them",
                       description="The cache holds the C kernels compiled into shared libraries "
                       "(and downloaded datasets under data/): $VGGEN_CACHE_DIR, else "
                       "$XDG_CACHE_HOME/vggen, else ~/.cache/vggen.")
    ksub = k.add_subparsers(dest="action", required=True, metavar="ACTION")
    ksub.add_parser("path", help="print the cache directory").set_defaults(func=_cmd_cache)
    ksub.add_parser("clear", help="remove the compiled libraries and their records (nothing else; datasets stay)"
                    ).set_defaults(func=_cmd_cache)

    return p


def _without_defaults(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``p`` changed so that parsing yields only the options typed on the command line."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _without_defaults(sub)
        else:
            action.default = argparse.SUPPRESS
    return p


def given_options(argv: list[str]) -> set[str]:
    """The destinations of the options ``argv`` sets (``--batch-size`` → ``batch_size``)."""
    return set(vars(_without_defaults(parser()).parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    args.given = given_options(argv)
    configure_logging(verbosity_level(args.verbose, args.quiet))
    log.debug("vggen %s: templates in %s, kernels in %s, compiled libraries in %s",
              __version__, templates_dir(), generated_dir(), cache_dir())
    try:
        return args.func(args)
    except VggenError as e:
        print(f"vggen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vggen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
