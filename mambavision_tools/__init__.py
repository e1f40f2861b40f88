"""The repository's tooling around the Hub model files. Nothing here is copied into a Hub repository.

- ``model_code``: the model files at the repository root, imported as a package.
- ``variants``: the published variants (and the models trained here) as one table.
- ``conversion``: original checkpoint -> Hub folder, built on ``configs`` (validated configs), ``checkpoints``
  (verified reading, key renames), ``hub_folder`` (what a folder holds), ``staging`` (atomic folders, locks,
  signals) and ``publishing`` (model card, upload); ``report`` holds its errors and progress lines.
- ``nvidia_hub``: NVIDIA's published Hub repositories read straight into this repository's classes (``from_nvidia``).
"""
