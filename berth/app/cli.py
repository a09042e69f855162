"""The `berth` command: one subcommand per stage. Each only parses arguments and calls the library.

Each command imports its stage inside its function, on purpose: the stages load datasets and transformers, which
read the hub's offline switches at import time, so `configure_offline_mode` must run before them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from berth.core.config import dump_config, load_config
from berth.core.errors import BerthError
from berth.core.hub import configure_offline_mode
from berth.core.process import end_launched_process

CONFIG_HELP = "YAML config file (see configs/)"
OVERRIDES_HELP = "config overrides as section.key=value, e.g. tokenizer.vocab_size=16000 output_dir=runs/x"


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help=CONFIG_HELP)
    parser.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _config_unless_printed(cls: type, args: argparse.Namespace) -> Any:
    """The resolved config, or None after printing it for --print-config."""
    cfg: Any = load_config(cls, args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return None
    return cfg


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from berth.tokenizer.config import TokenizerJobConfig
    from berth.tokenizer.train import format_summary, train_tokenizer

    cfg = _config_unless_printed(TokenizerJobConfig, args)
    if cfg is None:
        return 0
    print(format_summary(train_tokenizer(cfg)))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from berth.pretrain.config import PretrainConfig
    from berth.pretrain.prepare import dump_examples, format_stats, prepare
    from berth.tokenizer.train import ensure_tokenizer

    cfg = _config_unless_printed(PretrainConfig, args)
    if cfg is None:
        return 0
    prepared = prepare(cfg, ensure_tokenizer(cfg.tokenizer.path, cfg.tokenizer.config))
    logging.getLogger("berth").info("\n%s", format_stats(prepared))
    if args.dump:
        dump_examples(prepared, args.dump, sys.stdout)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from berth.pretrain.config import PretrainConfig
    from berth.pretrain.train import pretrain
    from berth.tokenizer.train import ensure_tokenizer

    cfg = _config_unless_printed(PretrainConfig, args)
    if cfg is None:
        return 0
    # The tokenizer stage builds tokenizer.path first when it holds none (on the main process first).
    pretrain(cfg, lambda: ensure_tokenizer(cfg.tokenizer.path, cfg.tokenizer.config))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from berth.finetune.config import FinetuneConfig
    from berth.finetune.train import finetune

    cfg = _config_unless_printed(FinetuneConfig, args)
    if cfg is None:
        return 0
    finetune(cfg)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from berth.finetune.predict import predict_file

    predict_file(args.model_dir, args.input, sys.stdout, batch_size=args.batch_size, progress=not args.quiet)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from berth.core.hub import push_folder

    url = push_folder(args.directory, args.repo_id, args.revision, args.private)
    logging.getLogger("berth").info("pushed %s to %s", args.directory, url)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from berth.app.demo import run_demo

    output_dir = args.output_dir or ("runs/demo-quick" if args.quick else "runs/demo")
    print(run_demo(output_dir, args.overrides, quick=args.quick))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="berth", description="Train your own BERT, from raw text to the Hub.")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    stages = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tok = stages.add_parser("tokenizer", help="train a WordPiece tokenizer")
    tok_actions = tok.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = tok_actions.add_parser("train", help="train WordPiece on a corpus and save it in Hugging Face format")
    _add_config_args(train)
    train.set_defaults(func=cmd_tokenizer_train)

    prep = stages.add_parser("prepare", help="tokenize a corpus and draw pretraining examples (cached)")
    _add_config_args(prep)
    prep.add_argument(
        "--dump",
        type=int,
        default=0,
        metavar="N",
        help="write N collated, masked training examples to standard output as JSON lines",
    )
    prep.set_defaults(func=cmd_prepare)

    pre = stages.add_parser("pretrain", help="pretrain BERT (MLM + NSP/SOP); under accelerate launch for many GPUs")
    _add_config_args(pre)
    pre.set_defaults(func=cmd_pretrain)

    fine = stages.add_parser("finetune", help="fine-tune a checkpoint: classification (long texts in windows) or NER")
    _add_config_args(fine)
    fine.set_defaults(func=cmd_finetune)

    pred = stages.add_parser("predict", help="label texts of any length with a fine-tuned model (JSON lines out)")
    pred.add_argument("model_dir", help="a fine-tuned model directory (a run's final/ or best/)")
    pred.add_argument(
        "--input",
        default="-",
        help="a file with one text a line, or JSON lines with a 'text' field (and 'text_pair' for a model of text "
        "pairs); - for stdin",
    )
    pred.add_argument("--batch-size", type=int, default=64, help="windows per forward pass (default: 64)")
    pred.set_defaults(func=cmd_predict)

    push = stages.add_parser("push", help="upload a model directory (a run's final/) to the Hugging Face Hub")
    push.add_argument("directory", help="a model directory in Hugging Face format, e.g. runs/pretrain/mini_zh/final")
    push.add_argument("--repo-id", required=True, help="OWNER/NAME of the model repo (created if missing)")
    push.add_argument("--revision", default="", help="a branch to push to (created if missing; default: main)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.set_defaults(func=cmd_push)

    demo = stages.add_parser("demo", help="run the pipeline on the embedded Chinese corpus")
    demo.add_argument("--output-dir", default="", help="where the demo writes (default: runs/demo, runs/demo-quick)")
    demo.add_argument("--quick", action="store_true", help="a smoke run in under 2 minutes (tiny model, few steps)")
    demo.add_argument("overrides", nargs="*", help="overrides for the pretraining config, e.g. data.seed=1")
    demo.set_defaults(func=cmd_demo)
    return parser


def configure_logging(quiet: bool = False) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # The libraries are chatty at INFO; their warnings still show.
    for name in ("datasets", "transformers", "httpx", "huggingface_hub", "urllib3", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Said on every checkpoint of a model with tied input/output embeddings, which is how BERT is meant to be.
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options (`--dump 3 data.seed=1`): argparse stops collecting a
    # positional list at the first option, so the ones after it arrive here as unknown arguments.
    args, extra = parser.parse_known_args(argv)
    late = [item for item in extra if "=" in item and not item.startswith("-")]
    if len(late) != len(extra) or (late and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(x for x in extra if x not in late) or ' '.join(late)}")
    if late:
        args.overrides = [*args.overrides, *late]
    configure_logging(args.quiet)
    # Before datasets or transformers are imported: they read the offline switches at import time.
    configure_offline_mode()
    from berth.runtime.accel import quiet_deepspeed  # after the offline switches: it imports accelerate

    quiet_deepspeed()
    try:
        code = args.func(args)
    except BerthError as exc:
        print(f"berth: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("berth: interrupted", file=sys.stderr)
        code = 130
    end_launched_process(code)  # a process of a launch of several ends here, without Python's finalization
    return code


if __name__ == "__main__":
    sys.exit(main())
