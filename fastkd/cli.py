"""The ``fastkd`` command.

    fastkd pretrain|distill CONFIG [key=value ...] [--resume]   training (methods of that role)
    fastkd eval knn|linear|finetune MODEL --train DIR --val DIR  k-NN, linear probe or fine-tuning
    fastkd launch [torchrun options] -m fastkd.cli distill ...  torchrun, exit 0 after a SIGTERM stop
    fastkd bench NAME [ARGS ...]                                fastkd.benchmarks.bench_NAME
    fastkd data sample|scan ...                                 sample dataset, dataset scan

Training runs unchanged under ``torchrun --nproc_per_node N -m fastkd.cli ...``. Exit codes: 0
success (also after a SIGTERM/SIGINT checkpoint), 1 a run stopped by non-finite losses, 2 a usage or
configuration error (``FASTKD_TRACEBACK=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from pathlib import Path

from fastkd.durable import atomic_write_json


def _train(args: argparse.Namespace) -> int:
    from fastkd.config import load_config
    from fastkd.methods import method_names
    from fastkd.runner import train_from_config
    from fastkd.train.trainer import NonFiniteLossError

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    config = load_config(args.config, overrides)
    other = "distill" if args.command == "pretrain" else "pretrain"
    if config.method_name in method_names(other):
        raise ValueError(f"method {config.method_name!r} is run with `fastkd {other}`, not `fastkd {args.command}`")
    try:
        result = train_from_config(config, resume=args.resume)
    except NonFiniteLossError as error:
        print(f"fastkd {args.command}: {error}", file=sys.stderr)
        return 1
    state = "preempted" if result.preempted else "finished"
    if os.environ.get("RANK", "0") == "0":  # torchrun: report once
        print(f"fastkd {args.command}: {state} at step {result.step}/{result.total_steps} "
              f"({result.skipped_steps} skipped); output in {config.train.output_dir}")
    return 0


def _cache_key(args: argparse.Namespace) -> str:
    """Names cached features after the model file (path, modification time, submodule) and the
    preprocessing, so a changed checkpoint or crop never reuses stale features."""
    path = Path(args.model).resolve()
    stamp = max((p.stat().st_mtime for p in path.rglob("*.pt")), default=0.0) if path.is_dir() else path.stat().st_mtime
    weights = getattr(args, "weights", "student")
    identity = f"{path}|{stamp}|{args.module}|{weights}|{args.arch}|{args.image_size}|{args.resize}"
    label = args.module if weights == "student" else weights
    return f"{path.stem}-{label}-{hashlib.sha1(identity.encode()).hexdigest()[:10]}"


def _finite_report(report: dict) -> dict:
    """``report`` with every non-finite float (NaN, inf) replaced by ``None`` and the replaced keys
    listed under ``"non_finite"``, so that the printed and written JSON is always valid."""
    replaced = []

    def clean(value, key):
        if isinstance(value, float) and not math.isfinite(value):
            replaced.append(key)
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{key}[{i}]") for i, v in enumerate(value)]
        return value

    cleaned = clean(report, "")
    if replaced:
        cleaned["non_finite"] = replaced  # these were NaN or infinite (JSON has no such numbers)
    return cleaned


def _load_model(args: argparse.Namespace):
    """``(model, source)`` of ``fastkd eval``'s MODEL, once ``--output`` is known to go into an existing folder."""
    from fastkd.eval.models import load_eval_model_described

    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise ValueError(f"--output {args.output}: folder {str(Path(args.output).resolve().parent)!r} does not exist")
    return load_eval_model_described(args.model, arch=args.arch, module=args.module, format=args.format,
                                     device=args.device, weights=args.weights)


def _emit_report(report: dict, output: str | None) -> int:
    """Print ``report`` as one line of valid JSON (non-finite numbers as null, named on stderr) and
    write it durably to ``output`` when given."""
    report = _finite_report(report)
    if "non_finite" in report:
        print(f"fastkd eval: note: {', '.join(report['non_finite'])} not finite (NaN or infinite), written as null",
              file=sys.stderr)
    print(json.dumps(report, allow_nan=False))
    if output:
        atomic_write_json(output, report)
    return 0


# the cached probe's defaults; the paper protocols (dino, mocov3) take theirs from fastkd.eval.linear_protocols
_CACHED_PROBE_DEFAULTS = {"epochs": 100, "lr": 0.1, "weight_decay": 0.0, "probe_batch_size": 256}
# options of one kind of linear protocol only (the paper protocols use weight decay 0 and augment every epoch)
_PROTOCOL_ONLY = {"lrs": "dino|mocov3", "n_last_blocks": "dino|mocov3", "avgpool_patches": "dino|mocov3",
                  "weight_decay": "cached", "cache_dir": "cached"}


def _linear_protocol_defaults(args: argparse.Namespace) -> None:
    """Fill the cached probe's defaults, and refuse options that do not apply to the chosen protocol."""
    cached = args.linear_protocol == "cached"
    for name, protocols in _PROTOCOL_ONLY.items():
        if getattr(args, name) is not None and (protocols == "cached") != cached:
            raise ValueError(f"--{name.replace('_', '-')} applies to --protocol {protocols} only, not to "
                             f"{args.linear_protocol} (the paper protocols use weight decay 0, augment every epoch)")
    if not cached and args.lr is not None and args.lrs is not None:
        raise ValueError("give --lr (one head) or --lrs (a sweep), not both")
    for name, value in _CACHED_PROBE_DEFAULTS.items() if cached else ():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _eval(args: argparse.Namespace) -> int:
    from fastkd.eval.evaluate import check_eval_options, default_resize, evaluate_knn, evaluate_linear
    from fastkd.eval.models import native_image_size

    if args.protocol == "finetune":
        return _finetune(args)
    if args.protocol == "linear":
        _linear_protocol_defaults(args)
    # the numeric options given (check_eval_options skips the others), before anything is loaded
    check_eval_options({name: value for name, value in vars(args).items() if value is not None}, cli=True)
    model, source = _load_model(args)
    if args.image_size is None:
        args.image_size = native_image_size(model)
    described = {"model": args.model, **source, "image_size": args.image_size,
                 "resize": args.resize or default_resize(args.image_size)}
    loader_options = dict(image_size=args.image_size, resize=args.resize, batch_size=args.batch_size,
                          backend=args.backend, num_workers=args.num_workers, device=args.device)
    cache = dict(cache_dir=args.cache_dir, cache_key=args.cache_key or (_cache_key(args) if args.cache_dir else None))
    if args.protocol == "knn":
        result = evaluate_knn(model, args.train, args.val, k=args.k, temperature=args.temperature,
                              **cache, **loader_options)
        report = {"protocol": "knn", **described, "k": result.k, "temperature": result.temperature,
                  "top1": result.top1, "top5": result.top5, "class_counts": result.class_counts}
    elif args.linear_protocol == "cached":
        result = evaluate_linear(model, args.train, args.val, epochs=args.epochs, lr=args.lr,
                                 weight_decay=args.weight_decay, probe_batch_size=args.probe_batch_size,
                                 **cache, **loader_options)
        report = {"protocol": "linear", "linear_protocol": "cached", **described, "epochs": args.epochs,
                  "top1": result.top1, "top5": result.top5, "train_loss": result.train_loss,
                  "class_counts": result.class_counts}
    else:
        from fastkd.eval.linear_protocols import evaluate_linear_protocol

        lrs = args.lrs if args.lrs is not None else ([args.lr] if args.lr is not None else None)
        result = evaluate_linear_protocol(
            model, args.train, args.val, args.linear_protocol, epochs=args.epochs, lrs=lrs,
            batch_size=args.probe_batch_size, image_size=args.image_size, resize=args.resize,
            n_last_blocks=args.n_last_blocks, avgpool_patches=args.avgpool_patches, backend=args.backend,
            num_workers=args.num_workers, device=args.device)
        report = {"protocol": "linear", "linear_protocol": args.linear_protocol, **described, **result.to_dict()}
        report["protocol"] = "linear"  # not the result's protocol (dino | mocov3, already linear_protocol)
    return _emit_report(report, args.output)


def _finetune(args: argparse.Namespace) -> int:
    """``fastkd eval finetune``: the DeiT / MAE fine-tuning recipe end to end (see fastkd.eval.finetune)."""
    from fastkd.eval.finetune import finetune, resolve_finetune_recipe

    overrides = dict(epochs=args.epochs, batch_size=args.batch_size, blr=args.blr, layer_decay=args.layer_decay,
                     drop_path=args.drop_path, global_pool=args.global_pool)
    resolve_finetune_recipe(args.recipe, **overrides)  # the recipe's options checked before the model is read
    model, source = _load_model(args)
    result = finetune(model, args.train, args.val, args.recipe, **overrides, image_size=args.image_size,
                      precision=args.precision, device=args.device, num_workers=args.num_workers, seed=args.seed,
                      output=args.output_dir)
    return _emit_report({"protocol": "finetune", "model": args.model, **source, **result.to_dict()}, args.output)


def benchmarks() -> dict:
    """``X`` -> the ``main(argv)`` of ``fastkd.benchmarks.bench_X``, every benchmark of ``fastkd bench``."""
    from fastkd.benchmarks import (bench_all, bench_backbone, bench_compile, bench_data, bench_e2e, bench_ema,
                                   bench_feature_align, bench_gather, bench_knn, bench_ops, bench_peers,
                                   bench_token_relation)

    modules = (bench_all, bench_backbone, bench_compile, bench_data, bench_e2e, bench_ema, bench_feature_align,
               bench_gather, bench_knn, bench_ops, bench_peers, bench_token_relation)
    return {module.__name__.rpartition(".bench_")[2]: module.main for module in modules}


def _bench(args: argparse.Namespace) -> int:
    mains = benchmarks()
    if args.name is None or args.name == "list":
        print("benchmarks: " + ", ".join(sorted(mains)))
        return 0
    if args.name not in mains:
        raise ValueError(f"unknown benchmark {args.name!r}; available: {', '.join(sorted(mains))}")
    result = mains[args.name](list(args.args))
    return result if isinstance(result, int) else 0


def _add_train_command(subparsers, name: str, methods: tuple[str, ...], text: str) -> None:
    parser = subparsers.add_parser(
        name, help=text, description=f"{text} ({', '.join(methods)}). Runs unchanged under torchrun.",
        epilog="overrides: dotted keys of the config, e.g. optim.blr=1.5e-4 train.epochs=10 method.mask_ratio=0.75",
    )
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest readable checkpoint in <train.output_dir>/checkpoints")
    parser.add_argument("--output-dir", help="shortcut for train.output_dir=DIR")
    parser.set_defaults(func=_train)


def _model_arguments(formats) -> argparse.ArgumentParser:
    """The arguments every ``fastkd eval`` protocol shares: the model, its splits, device and output."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("model", help="run directory, training checkpoint, student.pt, or an official "
                                      "MoCo v3 / MAE / DeiT / CLIP / timm checkpoint (with --arch)")
    common.add_argument("--train", required=True, help="ImageFolder of the memory bank / probe / fine-tuning "
                                                       "training set")
    common.add_argument("--val", required=True, help="ImageFolder of the evaluated images")
    common.add_argument("--arch", help="timm architecture (official checkpoints only)")
    common.add_argument("--format", default="auto", choices=formats)
    common.add_argument("--module", default="student",
                        help="dotted submodule of the method to evaluate (training checkpoints; default student)")
    common.add_argument("--weights", default="student", choices=("student", "teacher"),
                        help="run directories: evaluate student.pt (default) or teacher.pt, the EMA teacher's "
                             "backbone written by mocov3 / resmoco / mokd runs")
    common.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    common.add_argument("--num-workers", type=int, default=2)
    common.add_argument("--output", help="also write the result as JSON to this file")
    return common


def _add_eval_command(subparsers) -> None:
    from fastkd.data.loader import BACKENDS
    from fastkd.eval.linear_protocols import LINEAR_PROTOCOLS
    from fastkd.models.weights import FORMATS

    parser = subparsers.add_parser("eval", help="k-NN, linear-probe or fine-tuning evaluation of a saved model",
                                   description="Evaluate frozen features of a saved student or teacher.")
    protocols = parser.add_subparsers(dest="protocol", required=True)
    common = _model_arguments(FORMATS)
    for protocol, text in (("knn", "weighted k-NN (cosine, chunked)"), ("linear", "linear probe on cached features")):
        sub = protocols.add_parser(protocol, help=text, description=f"{text} on ImageFolder splits.", parents=[common])
        sub.add_argument("--image-size", type=int, help="centre-crop size (default: the size the model was built "
                                                        "for, e.g. a ViT's img_size; 224 for ResNets)")
        sub.add_argument("--resize", type=int, help="shorter-side resize (default image_size * 256/224)")
        sub.add_argument("--batch-size", type=int, default=64)
        sub.add_argument("--backend", default="auto", choices=BACKENDS)
        sub.add_argument("--cache-dir", help="cache the extracted features here")
        sub.add_argument("--cache-key", help="cache file prefix (default: derived from the model file, its "
                                             "modification time, --module and the crop)")
        if protocol == "knn":
            sub.add_argument("--k", type=int, default=20)
            sub.add_argument("--temperature", type=float, default=0.07)
        else:
            sub.add_argument("--protocol", dest="linear_protocol", default="cached",
                             choices=("cached", *LINEAR_PROTOCOLS),
                             help="cached: fast probe on cached centre-crop features (default); dino / mocov3: the "
                                  "papers' protocols (augmented crops every epoch, their optimiser, epochs and lr, "
                                  "an lr sweep with --lrs)")
            sub.add_argument("--epochs", type=int, default=None, help="default: 100 (cached), the protocol's")
            sub.add_argument("--lr", type=float, default=None,
                             help="cached: the lr (default 0.1); dino / mocov3: one base lr per 256 images")
            sub.add_argument("--lrs", type=float, nargs="+", default=None,
                             help="dino / mocov3: base lrs to sweep, one head each (default: the protocol's)")
            sub.add_argument("--weight-decay", type=float, default=None, help="cached probe only (default 0)")
            sub.add_argument("--probe-batch-size", type=int, default=None,
                             help="probe training batch (default: 256 cached, the protocol's: 1024)")
            sub.add_argument("--n-last-blocks", type=int, default=None,
                             help="dino / mocov3: concatenate the CLS of the last N blocks (default: DINO 4 for "
                                  "ViTs narrower than 768, else 1; MoCo v3 1)")
            sub.add_argument("--avgpool-patches", action=argparse.BooleanOptionalAction, help="dino / mocov3: "
                             "append the average patch token (default: DINO on for ViTs 768 wide and more)")
        sub.set_defaults(func=_eval)
    _add_finetune_command(protocols, common)


def _add_finetune_command(protocols, common: argparse.ArgumentParser) -> None:
    from fastkd.eval.finetune import FINETUNE_RECIPES

    sub = protocols.add_parser("finetune", help="end-to-end fine-tuning (DeiT / MAE recipe)", parents=[common],
                               description="Fine-tune a saved backbone with a classifier on ImageFolder splits: "
                                           "AdamW, layer-wise lr decay, RandAugment, mixup / cutmix, drop path, "
                                           "label smoothing (timm's implementations). Options left out take the "
                                           "recipe's values.")
    sub.add_argument("--recipe", default="mae", choices=tuple(FINETUNE_RECIPES),
                     help="mae: ViT-B MAE fine-tuning (100 epochs, layer decay 0.65); deit: DeiT (300 epochs)")
    sub.add_argument("--epochs", type=int)
    sub.add_argument("--batch-size", type=int, help="global batch (the lr scales with it; default the recipe's 1024)")
    sub.add_argument("--blr", type=float, help="base lr per 256 images")
    sub.add_argument("--layer-decay", type=float)
    sub.add_argument("--drop-path", type=float)
    sub.add_argument("--image-size", type=int, help="default: the size the model was built for")
    sub.add_argument("--global-pool", choices=("avg", "token"), help="default: avg (mae), token (deit)")
    sub.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--output-dir", help="write finetuned.pt and finetune.json here")
    sub.set_defaults(func=_eval)


def build_parser() -> argparse.ArgumentParser:
    from fastkd import __version__
    from fastkd.data.commands import register as register_data_commands
    from fastkd.methods import method_names

    parser = argparse.ArgumentParser(prog="fastkd", description="Kernel-backed self-supervised knowledge "
                                     "distillation of vision models.")
    parser.add_argument("--version", action="version", version=f"fastkd {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_command(subparsers, "pretrain", method_names("pretrain"), "pre-train a teacher")
    _add_train_command(subparsers, "distill", method_names("distill"), "distill a student from teachers")
    _add_eval_command(subparsers)
    subparsers.add_parser("launch", help="torchrun that exits 0 after a SIGTERM/SIGINT stop (python -m fastkd.launch)",
                          description="fastkd launch [torchrun options] -m fastkd.cli distill CONFIG ...: torchrun's "
                                      "command line; the first SIGTERM/SIGINT is passed to every worker, which write "
                                      "their stop checkpoint, and the launcher exits 0.", add_help=False)
    bench = subparsers.add_parser("bench", help="run a benchmark (fastkd bench list)", description=(
        "Run fastkd.benchmarks.bench_NAME.main(ARGS); `fastkd bench list` lists them. Common ARGS: --quick, --device "
        "cpu|cuda, --out DIR (default ./fastkd_bench_results or $FASTKD_BENCH_DIR), --publish (into "
        "benchmarks/results/ of the checkout in the current directory)."))
    bench.add_argument("name", nargs="?", help="benchmark name, or 'list'")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    bench.set_defaults(func=_bench)
    register_data_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["launch"]:  # torchrun's own command line, parsed by torch.distributed.run
        from fastkd.launch import main as launch

        return launch(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError) as error:
        if os.environ.get("FASTKD_TRACEBACK") == "1":
            raise
        # usage and configuration errors (bad values, missing files): exit 2; other OSErrors (a full disk): 1
        usage = isinstance(error, (ValueError, TypeError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
                                   PermissionError))
        parser.exit(2 if usage else 1, f"fastkd {args.command}: error: {error}\n"
                    + ("(set FASTKD_TRACEBACK=1 for the traceback)\n" if usage else ""))


if __name__ == "__main__":
    sys.exit(main())
