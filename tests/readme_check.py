"""Run the README's code blocks as written, in document order, on a fresh copy of the repository, offline.

    .venv/bin/python tests/readme_check.py [README.md]      # prints each block's outcome; exit 1 if one fails
    .venv/bin/python tests/readme_check.py --card VARIANT   # the model card rendered for a converted folder

A Markdown file other than the README runs the same way (tests/nvidia_card_snippets.md: NVIDIA's model-card usage).
``--card`` renders ``model_cards/mambavision.md`` for the variant's entry (mambavision_tools/variants.py), as the
converter does, for the tiny placeholder folder, saves it there as the folder's README.md and runs its blocks.

```python blocks run each in a fresh namespace: a block defines every name it uses (a name left undefined fails,
as it would for a reader who copies that block alone). ```bash blocks run with bash in the copy's root, after the
install command (the copy uses this checkout's .venv). Blocks in other languages, or none (sample output), are text.
The files the README leaves to the reader are provided, never names:

- ``converted/MambaVision-T-1K`` (convert_checkpoint.py's output), Hub model ids (``nvidia/MambaVision-...``) and
  the rendered card's repo id: a tiny converted folder (random weights, ImageNet head).
- ``cat.jpg``, ``image.png``: photo files in the working folder; images on the web (``requests.get`` of an image
  URL): ``cat.jpg``'s bytes. Any other request fails.
- ``.cuda()`` on a machine without CUDA: left out (the model and tensors stay on the CPU).
- ``pets/train``, ``pets/val``: ImageFolder trees (a folder of images per class); ``photos/``: a folder of images.

A block that cannot run here says why on the line before it, ``<!-- readme-check: skip: REASON -->`` (an
upload to the Hub, a GPU, several processes, the install itself); the check lists those blocks with their reason.
A bash block that installs (``scripts/install.sh``, ``pip install``) or runs the suite must be marked: the copy
shares this checkout's .venv.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub reads it: nothing may come from the network

import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from io import BytesIO  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\S*)\s*$")
SKIP = re.compile(r"<!--\s*readme-check:\s*skip:\s*(.*?)\s*-->")
HUB_ID = re.compile(r"\bnvidia/MambaVision-[\w.-]+")
INSTALLS = re.compile(r"scripts/install\.sh|pip install|pytest")  # would change .venv, or run the suite itself
IMAGE_URL = re.compile(r"^https?://\S+\.(jpe?g|png)$", re.IGNORECASE)
CUDA_CALL = re.compile(r"\.cuda\(\)")
RUNNABLE = ("python", "bash")
BASH_TIMEOUT = 600


@dataclass
class Block:
    language: str
    code: str
    line: int  # of the opening fence, 1-based
    skip: str = None  # the reason given in the marker, if any


def blocks(text):
    """The fenced code blocks of a Markdown text, each with the skip reason marked on the line before it."""
    found, lines, index = [], text.splitlines(), 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        end = next((j for j in range(index + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"README line {index + 1}: a code block that is never closed")
        before = lines[index - 1] if index else ""
        marker = SKIP.search(before)
        if marker and not marker.group(1):
            raise ValueError(f"README line {index}: a skip marker needs its reason")
        found.append(Block(opening.group(1).lower(), "\n".join(lines[index + 1 : end]) + "\n", index + 1,
                           marker.group(1) if marker else None))
        index = end + 1
    return found


def fresh_copy(destination):
    """The checkout's files (tracked, and new ones not ignored) copied to ``destination``, with its .venv."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    (destination / ".venv").symlink_to(ROOT / ".venv")


def provide_placeholders(workdir):
    """Make the files the README leaves to the reader; returns the converted folder that stands for every model."""
    from compat_worker import sample_images
    from conftest import TINY_ARCHITECTURE, configuration, save_tiny_folder

    config = configuration.MambaVisionConfig(**TINY_ARCHITECTURE, image_size=64)  # ImageNet's 1000 classes
    folder = save_tiny_folder(workdir / "converted" / "MambaVision-T-1K", config)

    pictures = iter(sample_images([(48, 40)] * (1 + 2 * 2 * 3 + 5)))  # each one different
    picture = next(pictures)
    picture.save(workdir / "cat.jpg")
    picture.save(workdir / "image.png")
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (workdir / "pets" / split / label).mkdir(parents=True)
            for i in range(3):
                next(pictures).save(workdir / "pets" / split / label / f"{i}.png")
    (workdir / "photos").mkdir()
    for i in range(5):
        next(pictures).save(workdir / "photos" / f"photo{i}.jpg")
    return folder


def with_hub_ids_replaced(code, folder, hub_ids=()):
    """``code`` with NVIDIA's Hub ids and each of ``hub_ids`` replaced by the local ``folder``."""
    for hub_id in hub_ids:
        code = code.replace(hub_id, str(folder))
    return HUB_ID.sub(str(folder), code)


def run_python(code, where):
    """Run a python block alone, in a fresh namespace (it sees only what it defines); returns None, or the failure
    with its traceback."""
    try:
        exec(compile(code, where, "exec"), {"__name__": "__main__"})
    except Exception:  # noqa: BLE001 - report any failure of the block, with its traceback
        return traceback.format_exc(limit=-3)
    return None


def for_this_machine(code):
    """``code`` without its ``.cuda()`` calls where CUDA is missing (snippets written for a GPU run on the CPU)."""
    import torch

    return code if torch.cuda.is_available() else CUDA_CALL.sub("", code)


def serve_images_locally(picture):
    """``requests.get`` of an image URL answers with the bytes of the file ``picture``; any other URL raises."""
    import requests

    def get(url, *args, **kwargs):
        if not IMAGE_URL.match(str(url)):
            raise requests.ConnectionError(f"readme_check runs offline: {url} is not an image it serves")
        response = requests.Response()
        response.status_code, response.url = 200, url
        response.raw = BytesIO(Path(picture).read_bytes())
        return response

    requests.get = get


def render_card(variant_name, folder):
    """The model card of ``variant_name``'s entry rendered for the model in ``folder``, saved there as README.md;
    returns (its text, its repo id)."""
    from mambavision_tools import publishing, variants
    from mambavision_tools import hub_folder
    from mambavision_tools.hub_folder import modeling

    variant = {**variants.VARIANTS, **variants.PROJECT_VARIANTS}[variant_name]
    shutil.copy(Path(folder).parents[1] / "cat.jpg", Path(folder) / hub_folder.EXAMPLE_IMAGE)  # the widget's image
    model = modeling.MambaVisionModelForImageClassification.from_pretrained(folder)
    card = publishing.render_model_card(variant, model, variant.repo_id)
    card.save(Path(folder) / "README.md")
    return card.content, variant.repo_id


def run(readme=ROOT / "README.md", log=print, card=None):
    """Run every block of ``readme`` (or of the model card of variant ``card``, rendered for the placeholder
    folder); returns (failures, skipped): lists of (block, message).

    The Hugging Face home (where transformers writes remote-code modules) becomes the scratch folder, for the
    python blocks too: so this runs in a process that has not imported transformers yet (this script's).
    """
    if {"huggingface_hub", "transformers"} & set(sys.modules):
        raise RuntimeError("readme_check.run() must come before huggingface_hub and transformers are imported: "
                           "they read HF_HOME once, and the blocks' modules would go to the user's cache")
    failures, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="readme-check-") as scratch:
        workdir = Path(scratch) / "MambaVision"
        workdir.mkdir()
        fresh_copy(workdir)
        os.chdir(workdir)
        home = Path(scratch) / "hf"
        os.environ.update(HF_HOME=str(home), HF_MODULES_CACHE=str(home / "modules"))  # bash blocks inherit it
        folder = provide_placeholders(workdir)
        serve_images_locally(workdir / "cat.jpg")
        if card:
            text, repo_id = render_card(card, folder)
            hub_ids = [repo_id]
            document = f"the model card of {card}"
        else:
            text, hub_ids, document = Path(readme).read_text(), [], Path(readme).name
        for block in (b for b in blocks(text) if b.language in RUNNABLE):
            where = f"{document} line {block.line} ({block.language})"
            if block.skip:
                skipped.append((block, block.skip))
                log(f"skip  {where}: {block.skip}")
                continue
            if block.language == "bash" and INSTALLS.search(block.code):
                message = "installs into .venv or runs the test suite: mark it <!-- readme-check: skip: REASON -->"
                failures.append((block, message))
                log(f"FAIL  {where}: {message}")
                continue
            start = time.monotonic()
            code = for_this_machine(with_hub_ids_replaced(block.code, folder, hub_ids))
            if block.language == "python":
                message = run_python(code, where)
            else:
                result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=workdir,
                                        capture_output=True, text=True, timeout=BASH_TIMEOUT)
                message = None if result.returncode == 0 else f"exit {result.returncode}\n{result.stderr[-3000:]}"
            seconds = time.monotonic() - start
            if message:
                failures.append((block, message))
                log(f"FAIL  {where} after {seconds:.1f} s:\n{block.code}{message}")
            else:
                log(f"ok    {where} ({seconds:.1f} s)")
        os.chdir(ROOT)
    return failures, skipped


if __name__ == "__main__":
    if sys.argv[1:2] == ["--card"]:
        failures, skipped = run(card=sys.argv[2])
    else:
        failures, skipped = run(sys.argv[1] if len(sys.argv) > 1 else ROOT / "README.md")
    print(f"{len(failures)} failed, {len(skipped)} skipped (marked)")
    sys.exit(1 if failures else 0)
