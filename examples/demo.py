"""The main job, offline: convert the shipped MambaVision-Digits checkpoint into a Hub-ready folder with
convert_checkpoint.py, then classify held-out digits through ``pipeline("image-classification")``.

    .venv/bin/python examples/demo.py                       # writes converted/MambaVision-Digits (replaced each run)
    .venv/bin/python examples/demo.py --output-dir DIR      # a new or empty folder of your choice

Prints a few predictions with their true labels, then the accuracy over the whole held-out split (360 images);
exits with status 1 if that is below 95%.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; set before huggingface_hub reads it

import argparse  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from transformers import pipeline  # noqa: E402

import convert_checkpoint  # noqa: E402
import digits  # noqa: E402

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "converted" / digits.VARIANT


def shown(path):
    """``path`` relative to the working directory when inside it, for short commands."""
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def classify_held_out(folder, samples):
    """Run the folder's pipeline on the held-out split; print ``samples`` predictions; return the accuracy."""
    classifier = pipeline("image-classification", model=str(folder), trust_remote_code=True)
    images, labels = digits.load_split("held_out")
    predictions = [top for top, *_ in classifier(images, top_k=1, batch_size=64)]
    print(f"\npipeline('image-classification', model={shown(folder)!r}, trust_remote_code=True) "
          f"on held-out digits (8x8 images):")
    for index, (prediction, label) in enumerate(zip(predictions[:samples], labels)):
        verdict = "ok" if prediction["label"] == str(label) else "WRONG"
        print(f"  image {index:3d}: predicted {prediction['label']} (score {prediction['score']:.3f}), "
              f"true {label}  {verdict}")
    wrong = [(index, prediction["label"], label)
             for index, (prediction, label) in enumerate(zip(predictions, labels)) if prediction["label"] != str(label)]
    correct = len(labels) - len(wrong)
    print(f"held-out accuracy: {correct}/{len(labels)} = {correct / len(labels):.2%}")
    for index, predicted, label in wrong:
        print(f"  wrong: image {index} predicted {predicted}, true {label}")
    return correct / len(labels)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, help=f"folder for the converted model (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--samples", type=int, default=12, help="predictions to print (default: 12)")
    args = parser.parse_args(argv)
    folder = args.output_dir or DEFAULT_OUTPUT
    command = ["--variant", digits.VARIANT, "--checkpoint", shown(digits.CHECKPOINT), "--output-dir",
               shown(folder), "--verify", *(["--overwrite"] if args.output_dir is None else [])]
    python = Path(sys.executable).absolute()  # as run: .venv/bin/python, not the interpreter it links to
    print(f"$ {python.relative_to(Path.cwd()) if python.is_relative_to(Path.cwd()) else python} convert_checkpoint.py "
          f"{shlex.join(command)}")
    status = convert_checkpoint.main(command)
    if status:
        return status
    accuracy = classify_held_out(folder, args.samples)
    print(f"the Hub-ready folder: {shown(folder)}")
    if accuracy < digits.MIN_ACCURACY:
        print(f"error: held-out accuracy {accuracy:.2%} is below {digits.MIN_ACCURACY:.0%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
