"""Convert NVIDIA's original MambaVision checkpoints into Hub-ready model folders, and publish them.

    python convert_checkpoint.py --variant MambaVision-T-1K --checkpoint mambavision_tiny_1k.pth.tar \\
        --output-dir converted/MambaVision-T-1K --verify
    python convert_checkpoint.py --all --checkpoint-dir originals/ --output-dir converted/ --verify
    python convert_checkpoint.py --variant MambaVision-T-1K --output-dir converted/MambaVision-T-1K \\
        --push-to-hub my-org/MambaVision-T-1K --dry-run

A folder holds ``config.json``, safetensors weights, the model code (loaded with ``trust_remote_code``), the
image processor and a model card. Checkpoints are read without running pickled code and verified (zip CRCs,
record sizes, finite values), checked tensor by tensor against the architecture before anything is written, and
folders appear only once complete. Every failure is one ``error:`` line on stderr and a non-zero exit status.
This file is the command line; the work is done by the ``mambavision_tools`` package.
"""

import argparse
import sys
from pathlib import Path

from transformers.utils import logging as transformers_logging
from transformers.utils.hub import convert_file_size_to_int

from mambavision_tools import variants
from mambavision_tools.configs import get_variant, read_config_file
from mambavision_tools.conversion import check_output_dir, convert, fetch_checkpoint
from mambavision_tools.hub_folder import is_model_folder
from mambavision_tools.publishing import push_to_hub
from mambavision_tools.report import ConversionError, Interrupted, UsageError, first_line, listing, progress
from mambavision_tools.staging import interrupts_as_errors


def _parser():
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group()  # none: --push-to-hub publishes an existing --output-dir
    what.add_argument("--variant", help="Hub name of a published variant, e.g. MambaVision-T-1K")
    what.add_argument("--config", help="JSON of config fields for a custom architecture (needs --checkpoint)")
    what.add_argument("--all", action="store_true", help="convert every variant, one folder each under --output-dir")
    what.add_argument("--list-variants", action="store_true", help="print the variants and exit")
    parser.add_argument("--checkpoint", help="original checkpoint (.pth.tar or .safetensors); default: download it")
    parser.add_argument("--checkpoint-dir", help="with --all: folder holding the original files (default: download)")
    parser.add_argument("--output-dir", help="folder to create (with --all: parent of one folder per variant)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an output folder that an earlier conversion wrote (refused for any other folder)")
    parser.add_argument("--force-overwrite", action="store_true",
                        help="replace the output folder whatever it holds (files not written by conversion are deleted)")
    parser.add_argument("--max-shard-size", default="2GB", type=_shard_size,
                        help="split weights above this size, e.g. 500MB (default: 2GB)")
    parser.add_argument("--verify", action="store_true",
                        help="reload the folder with trust_remote_code and compare outputs (tolerance 1e-5)")
    hub = parser.add_argument_group("publishing")
    hub.add_argument("--push-to-hub", metavar="REPO_ID",
                     help="upload the folder to this Hub repo (with --all: an owner, each variant to OWNER/<variant>)")
    hub.add_argument("--private", action="store_true", help="create the repo private")
    hub.add_argument("--token", help="Hub token (default: the logged-in one)")
    hub.add_argument("--commit-message", help="commit message of the upload")
    hub.add_argument("--revision", help="branch to upload to (created if missing)")
    hub.add_argument("--dry-run", action="store_true", help="list what would be uploaded, upload nothing")
    return parser


def _shard_size(value):
    """Validate a size such as ``2GB`` now, rather than after the checkpoint is read."""
    try:
        valid = convert_file_size_to_int(value) > 0
    except ValueError:
        valid = False
    if not valid:
        raise argparse.ArgumentTypeError(f"invalid size {value!r}: an integer and a unit, e.g. 500MB or 2GB")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _check_arguments(args):
    if args.list_variants:
        return
    if not (args.variant or args.config or args.all or args.push_to_hub):
        raise UsageError("one of --variant, --config, --all or --list-variants is required "
                         "(or --push-to-hub alone, to publish an existing --output-dir)")
    if not args.output_dir:
        raise UsageError("--output-dir is required")
    if args.checkpoint and not (args.variant or args.config):
        raise UsageError("--checkpoint goes with --variant or --config (use --checkpoint-dir with --all)")
    if args.checkpoint_dir and not args.all:
        raise UsageError("--checkpoint-dir goes with --all; use --checkpoint for one variant")
    if args.config and not args.checkpoint:
        raise UsageError("--config needs --checkpoint (a custom architecture has no file to download)")
    if not args.push_to_hub:
        given = [flag for flag, value in (("--private", args.private), ("--token", args.token),
                                          ("--commit-message", args.commit_message), ("--revision", args.revision),
                                          ("--dry-run", args.dry_run)) if value]
        if given:
            raise UsageError(f"{', '.join(given)} only apply with --push-to-hub")
    elif args.all and "/" in args.push_to_hub:
        raise UsageError("with --all, --push-to-hub takes an owner (user or organisation), not a repo id")


def _commit_message(push, variant, checkpoint):
    """The push options, with a commit message that names the source file unless one was given."""
    message = push["commit_message"] or f"Upload {variant.name} (converted from {Path(checkpoint).name})"
    return {**push, "commit_message": message}


def _list_variants():
    for variant in variants.VARIANTS.values():
        print(f"{variant.name:24} {variant.repo_id:32} {variant.checkpoint}")
    for variant in variants.SEGMENTATION_VARIANTS.values():
        print(f"{variant.name:24} {variant.repo_id:32} {variant.checkpoint} (segmentation; not part of --all)")
    for variant in variants.DETECTION_VARIANTS.values():
        print(f"{variant.name:24} {variant.repo_id:32} {variant.checkpoint} (its backbone; not part of --all)")
    for variant in variants.PROJECT_VARIANTS.values():
        print(f"{variant.name:24} {'trained in this repository':32} not part of --all; pass --checkpoint")


def _run(args):
    push = dict(private=args.private, token=args.token, commit_message=args.commit_message,
                revision=args.revision, dry_run=args.dry_run)
    options = dict(overwrite=args.overwrite, force=args.force_overwrite, max_shard_size=args.max_shard_size,
                   verify=args.verify)
    if args.list_variants:
        _list_variants()
        return
    if not (args.variant or args.config or args.all):
        folder = Path(args.output_dir)
        if not is_model_folder(folder):
            raise ConversionError(f"{folder} holds no converted model (no MambaVision config.json) to push")
        push_to_hub(folder, args.push_to_hub, **push)
        return
    if not args.all:
        output_dir = Path(args.output_dir)
        if args.config:
            variant, config = read_config_file(args.config, (args.push_to_hub or output_dir.name).split("/")[-1])
        else:
            variant, config = get_variant(args.variant), None
        check_output_dir(output_dir, args.overwrite, args.force_overwrite, args.checkpoint)  # before any download
        checkpoint = args.checkpoint or fetch_checkpoint(variant)
        convert(variant, checkpoint, output_dir, config=config, repo_id=args.push_to_hub, **options)
        if args.push_to_hub:
            push_to_hub(output_dir, args.push_to_hub, **_commit_message(push, variant, checkpoint))
        return
    root = Path(args.output_dir)
    jobs = [(variant, root / name) for name, variant in variants.VARIANTS.items()]
    for _, folder in jobs:  # fail before converting anything
        check_output_dir(folder, args.overwrite, args.force_overwrite)
    if args.checkpoint_dir:
        missing = [v.checkpoint for v, _ in jobs if not (Path(args.checkpoint_dir) / v.checkpoint).is_file()]
        if missing:
            raise ConversionError(f"not in {args.checkpoint_dir}: {listing(missing, limit=len(missing))}")
    for index, (variant, folder) in enumerate(jobs, 1):
        progress(f"[{index}/{len(jobs)}] {variant.name}")
        repo_id = f"{args.push_to_hub}/{variant.name}" if args.push_to_hub else None
        try:
            if args.checkpoint_dir:
                checkpoint = Path(args.checkpoint_dir) / variant.checkpoint
            else:
                checkpoint = fetch_checkpoint(variant)
            convert(variant, checkpoint, folder, repo_id=repo_id, **options)
            if repo_id:
                push_to_hub(folder, repo_id, **_commit_message(push, variant, checkpoint))
        except ConversionError as error:
            raise ConversionError(f"{variant.name}: {error}") from None


def main(argv=None):
    """Command-line entry point; returns the exit status (0 on success)."""
    transformers_logging.disable_progress_bar()  # stderr is for errors; progress goes to stdout
    try:
        with interrupts_as_errors():  # SIGINT and SIGTERM: clean up, then one line
            args = _parser().parse_args(argv)
            _check_arguments(args)
            _run(args)
    except (ConversionError, Interrupted) as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:  # permissions, a full disk outside the writing step, ...
        print(f"error: {first_line(error)}", file=sys.stderr)
        return 1
    except Exception as error:  # a failure no check foresaw: still one line (the library raises it in full)
        print(f"error: unexpected {type(error).__name__}: {first_line(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
