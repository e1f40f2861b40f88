"""Extract MambaVision features of a folder of images into sharded safetensors files, on one device or many.

    # one GPU (bf16 autocast, channels_last), or the CPU where there is none
    .venv/bin/python examples/extract_features.py --model nvidia/MambaVision-T-1K --images photos/ --output-dir feats/
    # N GPUs: one process per GPU, each writing its own shards
    .venv/bin/torchrun --nproc_per_node N examples/extract_features.py ...
    # throughput on random pixels and random weights, offline; nothing is written
    .venv/bin/torchrun --nproc_per_node 2 examples/extract_features.py --variant MambaVision-T-1K --synthetic 102400 \\
        --batch-size 256

The images are the files under --images (recursively) with an extension PIL opens, in sorted order, cut into
shards of --shard-size consecutive images. ``shard-K-of-N.safetensors`` holds ``pooler_output`` (images x channels:
the pooled features), with --stage-maps ``stage_1``..``stage_4`` too (each level's output averaged over space), and
``index`` (the images' positions in the sorted list), in float32; its metadata holds the images' paths relative to
--images (``paths``, a JSON list in row order) and those that could not be read (``failed``, path -> error).
The ranks share out the shards still missing, so every image is processed once; a shard appears complete or not at
all (written to a temporary file, then renamed), so a run killed midway resumes where it stopped when run again
with the same arguments (on any number of processes). Unreadable images are reported, skipped and listed with
their error in ``manifest.json``, written when every shard is there.
"""

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoModel

import scale_utils
from scale_utils import fail

PLAN = "plan.json"  # what the shards in the folder were made from: a rerun must match it to resume
MANIFEST = "manifest.json"


def list_images(root):
    """Paths (relative, POSIX) of the files under ``root`` whose extension PIL can open, sorted."""
    extensions = {extension for extension, format_ in Image.registered_extensions().items() if format_ in Image.OPEN}
    root = Path(root)
    if not root.is_dir():
        fail(f"the image folder {root} does not exist")
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*")
                  if path.suffix.lower() in extensions and path.is_file())


class ImageFiles(torch.utils.data.Dataset):
    """``(index, pixels, None)`` for a readable image, ``(index, None, error)`` for any other file."""

    def __init__(self, root, paths, processor):
        self.root, self.paths, self.processor = Path(root), paths, processor

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            with Image.open(self.root / self.paths[index]) as image:
                pixels = self.processor(image, return_tensors="pt")["pixel_values"][0]
        except Exception as error:  # noqa: BLE001 - whatever a broken file raises, it must not end the run
            return index, None, f"{type(error).__name__}: {error}"
        return index, pixels, None


def collate(items):
    """(indices of the readable images, their pixels stacked or None, [(index, error)] of the others)."""
    readable = [(index, pixels) for index, pixels, _ in items if pixels is not None]
    failed = [(index, error) for index, _, error in items if error is not None]
    indices = torch.tensor([index for index, _ in readable], dtype=torch.int64)
    pixels = torch.stack([pixels for _, pixels in readable]) if readable else None
    return indices, pixels, failed


class SyntheticBatches:
    """Batches of random pixels made on the device (no decoding cost), as the DataLoader over ``ImageFiles`` gives."""

    def __init__(self, batches, image_size, device):
        self.batches, self.image_size, self.device = batches, image_size, device

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            generator = torch.Generator(self.device).manual_seed(batch[0])
            pixels = torch.randn(len(batch), 3, self.image_size, self.image_size, generator=generator,
                                 device=self.device)
            yield torch.tensor(batch), pixels, []


def init_distributed(cpu):
    """Join torchrun's process group (NCCL on GPUs, gloo on CPU); returns (rank, world size, device)."""
    cuda = torch.cuda.is_available() and not cpu
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    rank, world = scale_utils.distributed()
    return rank, world, device


def shard_name(shard, shards):
    return f"shard-{shard:05d}-of-{shards:05d}.safetensors"


def write_atomically(path, tensors, metadata):
    """Write a safetensors file under a temporary name, flush it to disk, then rename: all or nothing."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, temporary, metadata=metadata)
    with open(temporary, "rb") as file:
        os.fsync(file.fileno())
    os.replace(temporary, path)


def prepare_output(output_dir, plan, shards, overwrite):
    """On rank 0: check ``plan`` against the folder's, clear leftovers, and list the shards still missing.

    Returns ``(missing shards, None)`` or ``(None, error message)``.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    ours = [*output_dir.glob("shard-*.safetensors"), *output_dir.glob(".shard-*.tmp"), output_dir / MANIFEST]
    previous = output_dir / PLAN
    if previous.is_file() and not overwrite:
        old = json.loads(previous.read_text())
        changed = sorted(key for key in plan.keys() | old.keys() if plan.get(key) != old.get(key))
        if changed:
            return None, (f"{output_dir} holds features made with other settings ({', '.join(changed)} differ): "
                          "use another --output-dir, or --overwrite to replace them")
    elif any(path.exists() for path in ours) and not overwrite:
        return None, f"{output_dir} holds shards without {PLAN}: use another --output-dir, or --overwrite"
    for path in ours:
        if overwrite or path.name.endswith(".tmp"):  # a temporary file is what a killed run left
            path.unlink(missing_ok=True)
    (output_dir / PLAN).write_text(json.dumps(plan, indent=2) + "\n")
    return [shard for shard in range(shards) if not (output_dir / shard_name(shard, shards)).exists()], None


def write_manifest(output_dir, shards, plan):
    """manifest.json: the shards, the number of images and the unreadable ones, from the shards' metadata."""
    entries, failed, rows = [], {}, 0
    for shard in range(shards):
        path = output_dir / shard_name(shard, shards)
        with safe_open(path, "pt") as file:
            metadata = file.metadata()
            count = file.get_slice("index").get_shape()[0]
        failed.update(json.loads(metadata["failed"]))
        entries.append({"file": path.name, "images": count})
        rows += count
    manifest = {**plan, "features": rows, "failed": failed, "shards": entries}
    (output_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return rows, failed


def extract(model, batches, device, bf16, stage_maps):
    """Yield (indices, {name: float32 features on the CPU}, failed) per batch, in order.

    On a GPU each batch's features are copied out asynchronously and yielded once the next batch is queued, so
    that the GPU does not wait for Python between batches.
    """
    cuda = device.type == "cuda"
    memory_format = torch.channels_last if cuda else torch.contiguous_format  # as the model's
    queued = None
    for indices, pixels, failed in batches:
        outputs = {}
        if pixels is not None:
            pixels = pixels.to(device, non_blocking=True, memory_format=memory_format)
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                output = model(pixel_values=pixels, output_hidden_states=stage_maps)
                features = {"pooler_output": output.pooler_output}
                if stage_maps:
                    # the four stage maps end hidden_states (model code of any version: some put the stem first)
                    for level, stage_map in enumerate(output.hidden_states[-4:], 1):
                        features[f"stage_{level}"] = stage_map.mean(dim=(2, 3), dtype=torch.float32)
                del output  # the maps: not held through the next batch's forward
                outputs = {name: values.float().to("cpu", non_blocking=cuda) for name, values in features.items()}
        copied = torch.cuda.Event() if cuda else None
        if copied is not None:
            copied.record()
        if queued is not None:
            yield finished(*queued)
        queued = indices, outputs, failed, copied
    if queued is not None:
        yield finished(*queued)


def finished(indices, outputs, failed, copied):
    """A queued batch of ``extract``, once its copies to the CPU are done."""
    if copied is not None:
        copied.synchronize()
    return indices, outputs, failed


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scale_utils.add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images (searched recursively)")
    source.add_argument("--synthetic", type=int, metavar="N", help="N random images (throughput measurement)")
    parser.add_argument("--output-dir", help="folder for the shards (required with --images)")
    parser.add_argument("--overwrite", action="store_true", help="replace the features already in --output-dir")
    parser.add_argument("--stage-maps", action="store_true", help="also store each level's spatially pooled output")
    parser.add_argument("--shard-size", type=int, default=10000, help="images per shard (default: 10000)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--num-workers", type=int, default=scale_utils.DEFAULT_WORKERS,
                        help="decoding processes per rank (default: 4, at most the usable cores)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is present")
    parser.add_argument("--fp32", action="store_true", help="float32 on GPU (default there: bf16 autocast)")
    parser.add_argument("--metrics-file", help="write the throughput and peak memory to this JSON file")
    args = parser.parse_args(argv)
    if args.images and not args.output_dir:
        parser.error("--output-dir is required with --images")
    if args.synthetic and args.output_dir:
        parser.error("--synthetic measures throughput and writes nothing: drop --output-dir")
    if args.shard_size < 1 or args.batch_size < 1:
        parser.error("--shard-size and --batch-size must be positive")
    return args


def main(argv=None):
    args = parse_arguments(argv)
    rank, world, device = init_distributed(args.cpu)
    try:
        return run(args, rank, world, device)
    finally:
        scale_utils.leave_process_group()


def run(args, rank, world, device):
    paths = list_images(args.images) if args.images else [f"synthetic/{i:08d}" for i in range(args.synthetic)]
    if not paths:
        fail(f"no images under {args.images} (extensions PIL opens: .jpg, .png, .webp, ...)")
    if args.synthetic:  # nothing is written: every batch is a shard, so that the ranks get equal shares
        args.shard_size = args.batch_size
    shards = -(-len(paths) // args.shard_size)
    digest = hashlib.sha256("\n".join(paths).encode()).hexdigest()
    if world > 1:
        digests = [None] * world
        dist.all_gather_object(digests, digest)
        if len(set(digests)) > 1:
            fail(f"the processes see different files under {args.images}: they must all see the same folder")

    output_dir = Path(args.output_dir) if args.output_dir else None
    plan = {"model": args.model or args.variant, "random_weights": bool(args.variant or args.random_weights),
            "images": len(paths), "list_sha256": digest, "shard_size": args.shard_size, "stage_maps": args.stage_maps}
    setup = [(list(range(shards)), None)]
    if rank == 0 and output_dir:
        setup = [prepare_output(output_dir, plan, shards, args.overwrite)]
    if world > 1:
        dist.broadcast_object_list(setup, src=0)
    missing, error = setup[0]
    if error:
        fail(error)
    scale_utils.main_process_print(
        f"{len(paths):,} images in {shards} shard(s) of {args.shard_size}, {world} process(es)"
        + (f"; {shards - len(missing)} shard(s) done already, {len(missing)} to go" if len(missing) < shards else ""))

    with scale_utils.main_process_first():
        model, processor = scale_utils.load_model(args, AutoModel)
    cuda = device.type == "cuda"
    model = model.to(device, memory_format=torch.channels_last if cuda else torch.contiguous_format).eval()
    bf16 = cuda and not args.fp32
    names = ["pooler_output"] + ([f"stage_{level}" for level in range(1, 5)] if args.stage_maps else [])
    mine = missing[rank::world]  # the missing shards, dealt out in turn
    batches = [list(range(start, min(start + args.batch_size, end)))
               for shard in mine
               for end in [min((shard + 1) * args.shard_size, len(paths))]
               for start in range(shard * args.shard_size, end, args.batch_size)]
    image_size = model.config.image_size
    if args.synthetic:
        loader = SyntheticBatches(batches, image_size, device)
    else:
        loader = torch.utils.data.DataLoader(ImageFiles(args.images, paths, processor), batch_sampler=batches,
                                             collate_fn=collate, num_workers=args.num_workers, pin_memory=cuda)

    # warm-up (allocator, cuDNN autotuning) on random pixels, outside the timed part
    warmup = torch.randn(min(args.batch_size, len(paths)), 3, image_size, image_size, device=device)
    list(extract(model, [(None, warmup, [])], device, bf16, args.stage_maps))
    scale_utils.synchronize()
    if world > 1:
        dist.barrier()
    start = time.perf_counter()

    count, shard_rows = 0, None
    progress = tqdm(total=sum(map(len, batches)), unit="img", disable=rank != 0, desc=f"rank 0 of {world}")
    for batch, (indices, outputs, failed) in zip(batches, extract(model, loader, device, bf16, args.stage_maps)):
        for index, error in failed:
            progress.write(f"warning: skipped {paths[index]}: {error}", file=sys.stderr)
        count += len(indices)
        progress.update(len(batch))
        if not output_dir:
            continue
        shard = batch[0] // args.shard_size
        if batch[0] % args.shard_size == 0:  # the shard's first batch
            shard_rows = {"index": [], "failed": {}, **{name: [] for name in names}}
        shard_rows["index"].append(indices)
        for name in names:
            shard_rows[name].append(outputs.get(name, torch.zeros(0, 0)))
        shard_rows["failed"].update({paths[index]: error for index, error in failed})
        if batch[-1] + 1 == min((shard + 1) * args.shard_size, len(paths)):  # its last batch
            write_shard(output_dir / shard_name(shard, shards), shard_rows, paths, names, model.config)
    progress.close()
    scale_utils.synchronize()
    if world > 1:
        dist.barrier()
    seconds = time.perf_counter() - start
    total = torch.tensor([count], device=device)
    if world > 1:
        dist.all_reduce(total)
    if total.item() > 0:
        scale_utils.report("extract", int(total.item()), seconds, args.metrics_file, batch_size=args.batch_size,
                           bf16=bf16)
    if rank == 0 and output_dir:
        rows, failed = write_manifest(output_dir, shards, plan)
        print(f"wrote {shards} shard(s) of features for {rows:,} images to {output_dir}"
              + (f"; {len(failed)} unreadable, listed in {MANIFEST}" if failed else ""))
    return 0


def write_shard(path, rows, paths, names, config):
    """One shard: its images' features and indices; in the metadata their paths and the unreadable images."""
    widths = {"pooler_output": config.num_features, **{f"stage_{i}": w for i, w in enumerate(config.hidden_sizes, 1)}}
    index = torch.cat(rows["index"])
    tensors = {name: torch.cat([part.reshape(-1, widths[name]) for part in rows[name]]) for name in names}
    metadata = {"paths": json.dumps([paths[i] for i in index.tolist()]), "failed": json.dumps(rows["failed"])}
    write_atomically(path, {**tensors, "index": index}, metadata)


if __name__ == "__main__":
    sys.exit(main())
