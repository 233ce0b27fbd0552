"""`plait`: one console script; each subcommand is a thin front over a package's `main(argv)`."""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "prep": ("data_prep.cli", "shard image/video-text corpora into WebDataset tars; index, verify, repair, merge"),
    "train": ("pipeline.train.loop", "pretrain with contrastive / masked / fusion objectives (Accelerate)"),
    "eval": ("pipeline.eval.evaluate", "zero-shot classification, retrieval and linear probe"),
    "export": ("pipeline.artifacts.export", "export a checkpoint as open_clip / Hugging Face / safetensors"),
    "caption": ("pipeline.eval.caption", "generate a caption per sample with an exported captioner (CoCa)"),
    "finetune": ("pipeline.eval.finetune", "fine-tune an exported model on a labelled shard set"),
    "launch": ("launch.cli", "render and submit SLURM jobs (training, prep arrays), or run locally"),
    "demo": ("pipeline.demo", "the whole pipeline on Fashion-MNIST: shards, train, zero-shot, export"),
}

USAGE = "usage: plait <command> [options]   (plait <command> --help for details)\n\ncommands:\n" + "\n".join(
    f"  {name:<9} {text}" for name, (_, text) in SUBCOMMANDS.items())

# User mistakes surface as these; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"plait: error: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[command][0])
    try:
        return module.main(rest) or 0
    except USER_ERRORS as e:
        print(f"plait {command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a shard server's redirect refused by the address rule (data_prep/shards/remote.py)
        from data_prep.shards.remote import refused_in
        if (refused := refused_in(e)) is None:
            raise
        print(f"plait {command}: error: {refused.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
