"""Command line: ``python -m training train ...`` (flags = TrainConfig fields), ``python -m training demo``
and ``python -m training reproduce`` (the paper's claim over seeds)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from .config import TrainConfig


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        hint = hints[field.name]
        if hint is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=field.default,
                                help="default: %(default)s")
            continue
        # Optional[X] -> X; the default None stays None when the flag is absent.
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        kind = args[0] if args else hint
        if field.name == "data":
            parser.add_argument(flag, dest=field.name, required=True, metavar="JSONL",
                                help="prompt/chosen/rejected rows (TRL's format)")
            continue
        parser.add_argument(flag, dest=field.name, type=kind, default=field.default, metavar=kind.__name__.upper(),
                            help="default: %(default)s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train_parser = sub.add_parser("train", help="train on a JSONL file of prompt/chosen/rejected rows",
                                  description="Flags are the fields of training.TrainConfig (see its docstring).")
    _add_config_flags(train_parser)
    train_parser.add_argument("--resume", action="store_true",
                              help="continue from <out-dir>/checkpoint (same flags as the interrupted run)")

    demo_parser = sub.add_parser("demo", help="the built-in CPU demo: SFT, then DPO vs DPO+SPO")
    demo_parser.add_argument("--out", default="runs/demo")
    demo_parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run of the pipeline")
    demo_parser.add_argument("--seed", type=int, default=0)
    demo_parser.add_argument("--no-progress", dest="progress", action="store_false")

    rep = sub.add_parser("reproduce", help="DPO, SimPO, IPO with and without SPO over seeds on the built-in task",
                         description="Defaults are `make reproduce`'s run (training.reproduce.ReproduceSettings).")
    rep.add_argument("--out", default="runs/reproduce")
    rep.add_argument("--quick", action="store_true", help="a seconds-long run of the pipeline")
    rep.add_argument("--seeds", type=int, nargs="+")
    rep.add_argument("--methods", nargs="+", help="some of DPO SimPO IPO")
    rep.add_argument("--jobs", type=int, help="worker processes (one torch thread each)")
    for name, kind in (("sft_steps", int), ("pref_steps", int), ("pref_lr", float), ("spo_lambda", float),
                       ("spo_margin", float), ("spo_anchor", str), ("spo_alpha", float)):
        rep.add_argument("--" + name.replace("_", "-"), dest=name, type=kind)
    rep.add_argument("--progress", action="store_true", help="progress bars (best with --jobs 1)")

    args = parser.parse_args(argv)
    if args.command == "reproduce":
        from .reproduce import ReproduceSettings, run_reproduce
        settings = ReproduceSettings.quick() if args.quick else ReproduceSettings()
        keys = ("seeds", "methods", "jobs", "sft_steps", "pref_steps", "pref_lr", "spo_lambda", "spo_margin",
                "spo_anchor", "spo_alpha")
        overrides = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
        settings = dataclasses.replace(settings, progress=args.progress, **overrides)
        run_reproduce(args.out, settings)
        return 0
    if args.command == "train":
        from .trainer import train
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
        result = train(TrainConfig(**values), resume=args.resume)
        # Conventional exit status for a run stopped by a signal (after its checkpoint was written).
        return 128 + result.stop_signal if result.status == "interrupted" else 0
    from .demo import DemoSettings, run_demo
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    settings = dataclasses.replace(settings, seed=args.seed, progress=args.progress)
    run_demo(args.out, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
