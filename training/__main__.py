"""Command line: ``python -m training train ...`` (flags = TrainConfig fields, plus one flag per field of
spo_kernels.PreferenceLossConfig), ``python -m training demo`` and ``python -m training reproduce`` (the
paper's claim over seeds). Under ``torchrun`` the ``train`` command runs distributed (DDP or FSDP2)."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing

from spo_kernels import PreferenceLossConfig

from . import config as config_module
from .config import MODEL_OWNED_LOSS_FIELDS, TrainConfig

# Help of the trainer's own flags (the loss flags take theirs from PreferenceLossConfig's docstring).
TRAIN_HELP = {
    "data": "prompt/chosen/rejected rows, one JSON object a line (TRL's format)",
    "model": "local Hugging Face causal LM (save_pretrained folder); default: the built-in small Llama",
    "tokenizer": "local tokenizer folder (default: --model's)",
    "out_dir": "run folder: metrics.jsonl, checkpoint/, final/, logps.png",
    "objective": "'preference': the fused preference loss; 'sft': token-mean NLL of the chosen completions",
    "packed": "padding-free batches: sequences packed into one row with cu_seqlens and position ids",
    "builtin_hidden_size": "built-in model: hidden size", "builtin_layers": "built-in model: layers",
    "builtin_heads": "built-in model: attention heads",
    "spo_alpha": "step size of the SFT step of spo_anchor='one_step'",
    "reference": "'precompute': reference log-probs computed once and cached; 'model': a frozen copy each step",
    "ref_cache": "reference cache file (default <out-dir>/ref_logps.pt)",
    "backend": "spo_kernels backend (default: by device, triton on GPU)",
    "max_prompt_length": "prompt tokens kept (from the left)", "max_completion_length": "completion tokens kept",
    "device": "'auto' (cuda when present), 'cpu', 'cuda' (cuda:LOCAL_RANK under torchrun) or 'cuda:N'",
    "dtype": "'fp32'; 'bf16' (bf16 weights and optimizer state); 'bf16-autocast' (fp32 weights, bf16 autocast)",
    "dist": "'auto' (ddp under torchrun with >1 process), 'none', 'ddp', 'fsdp2'",
    "max_steps": "optimizer steps", "batch_size": "pairs per optimizer step, over all ranks and micro-batches",
    "grad_accum": "micro-batches per rank and step (gradient accumulation)",
    "lr": "AdamW learning rate", "weight_decay": "AdamW weight decay", "warmup_steps": "linear warmup steps",
    "lr_schedule": "after warmup", "max_grad_norm": "gradient-norm clipping (0 = off)", "seed": "seed of the "
    "data order and the built-in model's weights", "num_threads": "torch CPU threads (0 = one per core)",
    "save_every": "checkpoint every N steps (and on SIGINT/SIGTERM)", "progress": "progress bar",
    "plot": "write logps.png at the end", "overwrite": "start over in a folder that holds a run",
}


def loss_field_docs() -> typing.Dict[str, str]:
    """``{field: text}`` from the ``name: text`` entries of PreferenceLossConfig's docstring."""
    docs, current = {}, None
    for line in (PreferenceLossConfig.__doc__ or "").splitlines():
        m = re.match(r"^\s{8}(\w+)(?: / \w+)*: (.*)$", line)
        if m:
            current = m.group(1)
            docs[current] = m.group(2).strip()
        elif current and re.match(r"^\s{12,}\S", line):
            docs[current] += " " + line.strip()
        else:
            current = None
    return docs


def allowed_values(name: str) -> typing.Optional[tuple]:
    """The allowed values of a string option, from the constant that the config module or spo_kernels'
    config module validates it with (``LOSS_TYPES``, ``SPO_NORMALIZE``, ...), when there is one."""
    from spo_kernels import config as loss_config_module
    own = {"objective": "OBJECTIVES", "reference": "REFERENCE_MODES", "lr_schedule": "LR_SCHEDULES",
           "dtype": "DTYPES", "dist": "DIST_MODES"}
    if name in own:
        return getattr(config_module, own[name])
    candidates = {"loss_type": "LOSS_TYPES", "spo_anchor": "SPO_ANCHORS"}
    base = candidates.get(name, name.upper())
    # e.g. spo_normalize -> SPO_NORMALIZE, f_divergence_type -> F_DIVERGENCES
    for constant in (base, base + "S", base.replace("_TYPE", "") + "S"):
        value = getattr(loss_config_module, constant, None)
        if isinstance(value, tuple) and value and all(isinstance(v, str) for v in value):
            return value
    return None


def _kind(hint):
    """``(element type, is a list)`` of a field's type hint (Optional / Union / List unwrapped)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin in (list, tuple, typing.Sequence) or getattr(origin, "__name__", "") == "Sequence":
        return (args[0] if args else str), True
    if origin is typing.Union:
        listy = [a for a in args if typing.get_origin(a) in (list, tuple) or
                 getattr(typing.get_origin(a), "__name__", "") == "Sequence"]
        scalar = [a for a in args if a not in listy]
        if listy:
            inner = typing.get_args(listy[0])
            return (inner[0] if inner else (scalar[0] if scalar else str)), True
        return (scalar[0] if scalar else str), False
    return hint, False


def _add_flag(parser, name: str, hint, default, help_text: str, dest: str) -> None:
    flag = "--" + name.replace("_", "-")
    kind, is_list = _kind(hint)
    choices = allowed_values(name) if kind is str else None
    text = (help_text or "see spo_kernels.PreferenceLossConfig").rstrip(".").replace("%", "%%") + "; default: %(default)s"
    if kind is bool:
        parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=text)
        return
    kwargs = dict(dest=dest, type=kind, default=default, help=text, metavar=kind.__name__.upper())
    if choices:
        kwargs.update(choices=choices, metavar=None)
    if is_list:
        kwargs["nargs"] = "+"
    parser.add_argument(flag, **kwargs)


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, then one per PreferenceLossConfig field the trainer does not name
    (``--dpop-lambda``, ``--rdpo-alpha``, ...: collected into ``loss_options``)."""
    hints = typing.get_type_hints(TrainConfig)
    docs = loss_field_docs()
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        if field.name == "loss_options":
            continue
        if field.name == "data":
            parser.add_argument("--data", dest="data", required=True, metavar="JSONL", help=TRAIN_HELP["data"])
            continue
        _add_flag(parser, field.name, hints[field.name], getattr(defaults, field.name),
                  TRAIN_HELP.get(field.name) or docs.get(field.name, ""), field.name)
    group = parser.add_argument_group("more loss options", "the other fields of spo_kernels.PreferenceLossConfig")
    own = {f.name for f in dataclasses.fields(TrainConfig)}
    loss_hints = typing.get_type_hints(PreferenceLossConfig)
    for field in dataclasses.fields(PreferenceLossConfig):
        if field.name in own or field.name in MODEL_OWNED_LOSS_FIELDS:
            continue
        default = field.default if field.default is not dataclasses.MISSING else None
        _add_flag(group, field.name, loss_hints[field.name], default, docs.get(field.name, ""),
                  "loss_option__" + field.name)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed ``train`` flags; loss options left at their defaults are not recorded."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "loss_options"}
    if isinstance(values["loss_type"], list) and len(values["loss_type"]) == 1:
        values["loss_type"] = values["loss_type"][0]
    defaults = {f.name: f.default for f in dataclasses.fields(PreferenceLossConfig)}
    options = {}
    for key, value in vars(args).items():
        if key.startswith("loss_option__"):
            name = key[len("loss_option__"):]
            if value != defaults.get(name):
                options[name] = value
    return TrainConfig(loss_options=options, **values)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train_parser = sub.add_parser("train", help="train on a JSONL file of prompt/chosen/rejected rows",
                                  description="Flags are the fields of training.TrainConfig (see its docstring) "
                                              "and of spo_kernels.PreferenceLossConfig.")
    add_train_flags(train_parser)
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
        try:
            cfg = config_from_args(args)
        except (TypeError, ValueError) as err:
            train_parser.error(str(err))
        try:
            result = train(cfg, resume=args.resume)
        except FileExistsError as err:  # a run folder in the way: a usage error, said plainly
            train_parser.error(str(err))
        # Conventional exit status for a run stopped by a signal (after its checkpoint was written).
        return 128 + result.stop_signal if result.status == "interrupted" else 0
    from .demo import DemoSettings, run_demo
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    settings = dataclasses.replace(settings, seed=args.seed, progress=args.progress)
    run_demo(args.out, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
