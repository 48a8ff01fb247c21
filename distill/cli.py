"""``distill`` command line: argparse over the stage functions, no logic of its own.

Every stage's flags are generated from its config dataclass (see config.py), so a flag and a
pipeline TOML key are the same option; flags win. User errors exit 2 with one line on stderr.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import signal
import sys
import threading
import typing
from pathlib import Path

from . import config as C
from .files import Terminated, UserError, os_fault

DEMO_PIPELINE = "pipelines/demo.toml"


class _Parser(argparse.ArgumentParser):
    def error(self, message):            # argparse's usage errors: one line, exit 2 ("distill train-student: error: ...")
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _add_config_flags(p: argparse.ArgumentParser, cls) -> None:
    """One flag per config field; defaults are None so that unset flags do not override the file."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        helptext = f.metadata.get("help", "")
        if f.metadata.get("range"):
            helptext += f" (in {f.metadata['range'][0]})"
        if f.default is not dataclasses.MISSING and f.default not in (None, False, ()):
            helptext += f" (default: {','.join(map(str, f.default)) if isinstance(f.default, tuple) else f.default})"
        kw = dict(dest=f.name, default=None, help=helptext)
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
        if tp is bool:
            p.add_argument(flag, action="store_const", const=True, **kw)
        elif typing.get_origin(tp) is tuple and typing.get_args(tp)[0] is str:
            p.add_argument(flag, action="append", **kw)
        else:
            p.add_argument(flag, **kw)
    p.add_argument("--config", metavar="PIPELINE.toml", help="read this stage's options from a pipeline file (flags win)")


def _stage_config(cls, stage: str, args: argparse.Namespace):
    layers = []
    policy = None
    if args.config:
        pipe = C.load_pipeline(args.config)
        layers.append(pipe.stage_layer(stage))
        policy = pipe.policy
        if pipe.storage and not args.storage_options:
            from . import storage
            storage.set_options(pipe.storage)
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    layers.append(flags)
    return C.build(cls, *layers, where=args.config or "flags"), policy


# ----------------------------------------------------------------------------- commands

def cmd_make_shards(args) -> int:
    from .data.shards import make_shards
    from .progress import bar
    pbar = bar(None, "make-shards", "img", args.quiet)
    try:
        index, skips = make_shards(args.src, args.out, prefix=args.prefix, shard_size=args.shard_size, keys=args.keys,
                                   shuffle=not args.no_shuffle, seed=args.seed,
                                   classes_file=args.classes, overwrite=args.overwrite,
                                   progress=pbar.update if pbar else None)
    finally:
        if pbar:
            pbar.close()                 # its line ends before any error's line
    reasons: dict[str, int] = {}
    for sk in skips:
        reasons[sk.reason.split(":")[0]] = reasons.get(sk.reason.split(":")[0], 0) + 1
    why = " (" + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())) + ")" if reasons else ""
    print(f"wrote {index.num_samples} samples in {len(index.shards)} shard(s) of {index.num_classes} classes "
          f"to {args.out}; skipped {len(skips)}{why}")
    for sk in skips:
        print(f"  skipped {sk.shard or sk.key}: {sk.reason}")
    return 0


def cmd_stage(args) -> int:
    """adapt-teacher, filter-labels, cache-teacher or train-student: run it, print its summary (under
    DDP only rank 0's); 1 when shards failed."""
    stage = args.command
    cfg, policy = _stage_config(STAGES[stage][0], stage, args)
    res = _run_stage(stage, cfg, policy)
    if getattr(res, "rank", 0) == 0:
        print(res.summary())
    return 1 if getattr(res, "failed", None) else 0


def cmd_verify(args) -> int:
    from .cache import verify_cache
    res = verify_cache(args.cache_dir, recompute=args.recompute, teacher=args.teacher or (),
                       teacher_checkpoint=args.teacher_checkpoint or (), seed=args.seed, device=args.device,
                       allow_replay_drift=args.allow_replay_drift)
    print(res.summary())
    return 0 if res.ok else 1


def cmd_convert_cache(args) -> int:
    from .cache import convert_cache
    out = convert_cache(args.old, args.new, quiet=args.quiet)
    print(f"converted {args.old} -> {out}")
    return 0


def cmd_pull(args) -> int:
    from .cache.transfer import pull
    print(pull(args.url, args.dir, epochs=args.epochs, shards=args.shards, quiet=args.quiet).summary())
    return 0


def cmd_push(args) -> int:
    from .cache.transfer import push
    print(push(args.dir, args.url, quiet=args.quiet).summary())
    return 0


def cmd_models(args) -> int:
    import json

    from .models.catalog import describe_models, format_table
    try:
        rows = describe_models(args.names or None, latency=args.latency)
    except ValueError as e:
        raise UserError(str(e)) from None
    print("\n".join(json.dumps(r) for r in rows) if args.json else format_table(rows))
    return 0


def cmd_inspect(args) -> int:
    from .inspect import describe, skipped_tsv
    print(skipped_tsv(args.path) if args.skipped else describe(args.path, n=args.n))
    return 0


# stage -> (its config, its pipeline section's short name, module:function that runs it)
STAGES = {"adapt-teacher": (C.AdaptConfig, "adapt", "adapt:adapt_teacher"),
          "filter-labels": (C.FilterConfig, "filter", "filter:filter_labels"),
          "cache-teacher": (C.CacheConfig, "cache", "cache:cache_teacher"),
          "train-student": (C.TrainConfig, "train", "train:train_student")}


def _run_stage(stage: str, cfg, policy: dict | None):
    module, func = STAGES[stage][2].split(":")
    run = getattr(importlib.import_module(f".{module}", __package__), func)
    return run(cfg) if stage == "filter-labels" else run(cfg, policy)


def run_pipeline(path: str, only: list[str] | None = None, quiet: bool = False) -> dict:
    """Run the stages of a pipeline file in order; returns {stage: result}."""
    pipe = C.load_pipeline(path)
    if pipe.storage:
        from . import storage
        storage.set_options(pipe.storage)
    results = {}
    extra = {"quiet": True} if quiet else {}
    # every stage's options (and the policy) checked before the first stage starts
    cfgs = {stage: C.build(STAGES[stage][0], pipe.stage_layer(stage), extra, where=f"[{stage}] of {path}")
            for stage in C.STAGE_ORDER if stage in pipe.stages and not (only and stage not in only)}
    if pipe.policy is not None:
        from .data.augment import load_policy
        load_policy(table=pipe.policy)
    for stage, cfg in cfgs.items():
        main = os.environ.get("RANK", "0") == "0"          # under torchrun only rank 0 speaks
        if main:
            print(f"== {stage}", flush=True)
        res = _run_stage(stage, cfg, pipe.policy)
        if main:
            print(res.summary(), flush=True)
        results[stage] = res
        if getattr(res, "failed", None):
            raise SystemExit(f"distill: {stage} failed; later stages not run")
    return results


def cmd_run(args) -> int:
    run_pipeline(args.pipeline, args.only, args.quiet)
    return 0


def cmd_demo(args) -> int:
    path = args.pipeline or DEMO_PIPELINE
    if not Path(path).exists():
        raise UserError(f"{path} not found: run distill demo from the repository root (or pass --pipeline)")
    results = run_pipeline(path, quiet=args.quiet)
    print("\n== demo summary")
    if "filter-labels" in results:
        f = results["filter-labels"]
        print(f"filter-labels: scored {f.samples} samples, flagged {f.dropped} ({f.dropped / max(f.samples, 1):.1%})")
    if "cache-teacher" in results:
        c = results["cache-teacher"]
        print(f"cache-teacher: {c.records} records ({c.samples} samples x {c.epochs} epochs), "
              f"{c.bytes_per_record:.1f} bytes/record, {c.records_per_s:,.0f} records/s")
    if "train-student" in results:
        t = results["train-student"]
        pct = lambda x: "n/a" if x is None else f"{x:.1f}%"
        line = f"train-student: {t.run_dir}: val top-1 {pct(t.final_top1)} from the cache"
        if getattr(t, "hard_labels", None) is not None:
            line += f", {pct(t.hard_labels.final_top1)} from hard labels (same student, epochs, seed)"
        print(line)
    return 0


STORAGE_HELP = ("JSON object of options for the object store's filesystem (s3fs, gcsfs), e.g. "
                '{"endpoint_url": "http://minio:9000"}; default: the standard environment (AWS_*, '
                "GOOGLE_APPLICATION_CREDENTIALS); used by this process and its workers, never written anywhere")


def _add_transfer_parsers(sub) -> None:
    """distill pull and distill push."""
    s = sub.add_parser("pull", help="copy a cache from object storage (or a directory): all, or its first epochs and some shards",
                       description="Copy the cache at URL into DIR, checking every byte against the manifest and the "
                                   "files' checksums; --epochs 0-B fetches only those epochs' byte ranges. Rerun to resume.")
    s.add_argument("url", metavar="CACHE_URL")
    s.add_argument("dir", metavar="DIR")
    s.add_argument("--epochs", metavar="0-B", help="only epochs 0..B (the result is a cache of B+1 epochs)")
    s.add_argument("--shards", metavar="PATTERN", help="only the shards whose names match this glob, e.g. 'train-00000*'")
    s.add_argument("--storage-options", metavar="JSON", help=STORAGE_HELP)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_pull)

    s = sub.add_parser("push", help="upload a cache directory to object storage",
                       description="Upload the cache in DIR to URL: files checked, uploaded whole, the manifest last. "
                                   "Rerun to resume.")
    s.add_argument("dir", metavar="DIR")
    s.add_argument("url", metavar="CACHE_URL")
    s.add_argument("--storage-options", metavar="JSON", help=STORAGE_HELP)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_push)


def _add_make_shards_parser(sub) -> None:
    s = sub.add_parser("make-shards", help="image folder tree or CSV -> webdataset shards + index.json",
                       description="Turn an image-folder tree (one folder per class) or a CSV/TSV of path,label into webdataset shards.")
    s.add_argument("src", metavar="SRC", help="image folder (one subfolder per class) or CSV/TSV file of path,label")
    s.add_argument("out", metavar="OUT", help="output directory for <prefix>-%%06d.tar and index.json")
    s.add_argument("--prefix", default="train", help="shard name prefix (default: train)")
    s.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    s.add_argument("--keys", choices=["stem", "path"], default="stem", help="sample keys from file stems or relative paths")
    s.add_argument("--classes", metavar="FILE", help="class names, one per line, in label order (CSV input)")
    s.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    s.add_argument("--no-shuffle", action="store_true",
                   help="keep the listing order (class by class for a folder tree) instead of shuffling the dataset")
    s.add_argument("--seed", type=int, default=0, help="seed of the dataset shuffle (default: 0)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_make_shards)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="distill", description="Offline knowledge distillation: run the teacher once, train students from its cache.")
    p.add_argument("--version", action="version", version=f"distill {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    _add_make_shards_parser(sub)

    for name, text in (
            ("adapt-teacher", "fit a pretrained ViT teacher to the shards' classes "
             "(attn-only, RepAdapter merged back, linear, full); writes a teacher directory for --teacher/--scorer"),
            ("filter-labels", "score samples with a model and flag noisy labels"),
            ("cache-teacher", "run the teacher over E augmented epochs; store top-K + seeds"),
            ("train-student", "train a TinyViT student from the cache (or hard labels)")):
        s = sub.add_parser(name, help=text, description=text)
        _add_config_flags(s, STAGES[name][0])
        s.add_argument("--storage-options", metavar="JSON", help=STORAGE_HELP)
        s.set_defaults(func=cmd_stage)

    s = sub.add_parser("verify", help="check a cache against its manifest; recompute records with the teacher",
                       description="Check files, checksums and counts; with --recompute N, recompute N random records.")
    s.add_argument("cache_dir", metavar="CACHE_DIR")
    s.add_argument("--recompute", type=int, default=0, metavar="N", help="records to recompute with the teacher")
    s.add_argument("--teacher", action="append", metavar="SPEC",
                   help="teacher to use (default: the manifest's, when a .pt2 file, adapted-teacher directory or "
                        "timm: name; a TorchScript or module:callable teacher runs code, so it must be given here)")
    s.add_argument("--teacher-checkpoint", action="append", metavar="PATH")
    s.add_argument("--seed", type=int, default=0, help="which random records")
    s.add_argument("--device", default="cpu")
    s.add_argument("--allow-replay-drift", action="store_true",
                   help="do not count views that replay differently here (other Pillow/libjpeg-turbo) as problems")
    s.add_argument("--storage-options", metavar="JSON", help=STORAGE_HELP)
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("convert-cache", help="rewrite a cache of an older format version in the current one",
                       description="Write NEW, a copy of the cache OLD in the current format (same records); OLD is not changed.")
    s.add_argument("old", metavar="OLD")
    s.add_argument("new", metavar="NEW")
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--storage-options", metavar="JSON", help=STORAGE_HELP)
    s.set_defaults(func=cmd_convert_cache)

    s = sub.add_parser("inspect", help="summarise a shard, cache, filter or run directory",
                       description="Print what a distill directory holds: counts, classes, sizes, sample records.")
    s.add_argument("path", metavar="PATH")
    s.add_argument("-n", type=int, default=3, help="example rows to show")
    s.add_argument("--skipped", action="store_true",
                   help="print every skipped sample recorded for PATH as TSV (shard, key, reason) instead")
    s.add_argument("--storage-options", metavar="JSON", help=STORAGE_HELP)
    s.set_defaults(func=cmd_inspect)

    _add_transfer_parsers(sub)

    s = sub.add_parser("models", help="list the student models: parameters, GFLOPs, source paper",
                       description="List the registered students (train-student --model): parameters with a "
                                   "1,000-class head, GFLOPs (multiply-accumulates) at 224 px, source paper.")
    s.add_argument("names", nargs="*", metavar="MODEL", help="only these models")
    s.add_argument("--latency", action="store_true",
                   help="also measure CPU latency: batch 1, 224 px, median of 10 forwards (seconds per model)")
    s.add_argument("--json", action="store_true", help="one JSON object per model instead of a table")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("run", help="run a pipeline TOML file stage by stage", description="Run the stages of a pipeline file in order.")
    s.add_argument("pipeline", metavar="PIPELINE.toml")
    s.add_argument("--only", action="append", choices=list(C.STAGE_ORDER), help="run only this stage (repeatable)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("demo", help="run pipelines/demo.toml on the bundled digits shards",
                       description="Run the whole pipeline on the bundled demo data and print a summary.")
    s.add_argument("--pipeline", help=f"pipeline file (default: {DEMO_PIPELINE})")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_demo)
    return p


def _version() -> str:
    from . import __version__
    return __version__


def _resume_hint(args, argv: list[str]) -> str:
    """What to type after an interrupt: the same command resumes (train-student: with --resume)."""
    import shlex
    cmd = "distill " + shlex.join(argv)
    command = getattr(args, "command", None)
    if command in ("cache-teacher", "filter-labels"):
        return f"finished shards are kept; rerun the same command to resume: {cmd}"
    if command in ("train-student", "adapt-teacher"):
        if args.resume:
            return f"finished epochs are kept; rerun the same command to resume: {cmd}"
        return f"finished epochs are kept; rerun with --resume to continue: {cmd} --resume"
    if command in ("pull", "push"):
        return f"files already copied are kept; rerun the same command to resume: {cmd}"
    if command in ("run", "demo"):
        return (f"finished shards (and epochs of a train-student with resume = true) are kept; rerun the same "
                f"command to resume: {cmd}")
    if command == "make-shards":
        return f"the shards are incomplete; rerun with --overwrite to write them again: {cmd} --overwrite"
    if command == "convert-cache":
        return f"NEW holds a partial conversion; rerun the same command to redo it: {cmd}"
    return f"rerun: {cmd}"


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Exit 0 done, 1 failed (a stage's failures, or a fault of the machine: disk full, read-only,
    no permission: one line naming the path), 2 refused (user error), 130 Ctrl-C, 143 SIGTERM
    (both: one line with the command that resumes; locks and reader marks released)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)          # a scheduler's stop: like Ctrl-C
    try:
        if getattr(args, "storage_options", None):
            from . import storage
            storage.set_options(args.storage_options)
        return int(args.func(args) or 0)
    except UserError as e:
        from .storage import redact
        sys.stderr.write(f"distill: error: {redact(str(e))}\n")
        return 2
    except KeyboardInterrupt as e:
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        sys.stderr.write(f"distill: {how}; {_resume_hint(args, argv)}\n")
        return 143 if isinstance(e, Terminated) else 130
    except OSError as e:
        line = os_fault(e)
        if line is None:
            raise
        sys.stderr.write(f"distill: error: {line}; then {_resume_hint(args, argv)}\n")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
