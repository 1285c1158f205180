"""The ``vggen`` command line.

Every user-facing failure is a VggenError, printed as one line on stderr with
a non-zero exit; no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import VggenError


def _cmd_check(args) -> int:
    from .report import write_markdown
    from .verify import check_all

    rows = check_all()
    if args.markdown:
        write_markdown(args.markdown, rows)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2, ensure_ascii=False))
    else:
        header = ("layer", "gradient", "eq.", "method", "verdict", "finite diff.", "detail")
        table = [(r.layer, r.gradient, r.equation or "—", r.method, r.verdict,
                  f"{r.fd_error:.1e}", r.detail) for r in rows]
        widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
        for line in [header] + table:
            print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())
        failed = sum(r.verdict != "pass" for r in rows)
        print(f"\n{len(rows) - failed} passed, {failed} failed")
    return 1 if any(r.verdict != "pass" for r in rows) else 0


def _cmd_build(args) -> int:
    from .codegen import build

    if args.check:
        stale = build(args.out, check=True)
        if stale:
            print("generated/ is stale; run `vggen build`:", file=sys.stderr)
            for path in stale:
                print(f"  {path}", file=sys.stderr)
            return 1
        print("generated/ is up to date")
        return 0
    written = build(args.out)
    print(f"wrote {len(written)} files under {args.out}/")
    return 0


def _cmd_train(args) -> int:
    from .train import TrainConfig, train

    config = TrainConfig(**{k: v for k, v in vars(args).items()
                            if k in TrainConfig.__dataclass_fields__})
    train(config)
    return 0


def _cmd_data(args) -> int:
    from .data import default_data_dir, fetch_cifar10

    path = fetch_cifar10(default_data_dir(args.data))
    print(f"CIFAR-10 is in {path}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vggen", description=__doc__.splitlines()[0] if __doc__ else None)
    p.description = ("vggen: VGG layers written once as SymPy equations; backward derived and "
                     "proved; C (OpenMP) and CUDA kernels generated; the network trained with them.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("check", help="derive every backward and prove it against the document")
    c.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    c.add_argument("--markdown", metavar="FILE", help="also write the derivations as Markdown (LaTeX math)")
    c.set_defaults(func=_cmd_check)

    b = sub.add_parser("build", help="regenerate the C and CUDA kernels into generated/")
    b.add_argument("--check", action="store_true", help="write nothing; exit 1 if generated/ is stale")
    b.add_argument("--out", default="generated", help="output directory (default: generated)")
    b.set_defaults(func=_cmd_build)

    t = sub.add_parser("train", help="train the generated VGG")
    t.add_argument("--target", default="auto", choices=["auto", "c", "cuda", "numpy"],
                   help="kernel backend (default: auto = cuda if a GPU and CuPy are present, else c)")
    t.add_argument("--dataset", default="digits", choices=["digits", "cifar10"],
                   help="digits: scikit-learn's bundled digits at 32×32×3, no download (default)")
    t.add_argument("--data", metavar="DIR", help="CIFAR-10 directory (default: $VGGEN_DATA or the cache)")
    t.add_argument("--epochs", type=int, default=10, help="epochs (default: 10)")
    t.add_argument("--batch-size", type=int, default=64, help="mini-batch size (default: 64)")
    t.add_argument("--lr", type=float, default=0.05, help="initial learning rate (default: 0.05)")
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    t.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay (default: 5e-4)")
    t.add_argument("--width", type=int, default=64, help="channels of the first stage, C1 (default: 64)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    t.add_argument("--metrics", metavar="FILE", help="append one JSON line per epoch")
    t.add_argument("--checkpoint", metavar="DIR", help="write a checkpoint after every epoch")
    t.add_argument("--resume", metavar="FILE", help="continue from a checkpoint")
    t.add_argument("--no-dropout", dest="dropout", action="store_false", help="switch dropout off")
    t.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no random crops or flips")
    t.set_defaults(func=_cmd_train)

    d = sub.add_parser("data", help="datasets")
    dsub = d.add_subparsers(dest="action", required=True, metavar="ACTION")
    f = dsub.add_parser("fetch", help="download a dataset and verify its checksum")
    f.add_argument("name", choices=["cifar10"])
    f.add_argument("--data", metavar="DIR", help="destination (default: $VGGEN_DATA or the cache)")
    f.set_defaults(func=_cmd_data)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
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
