"""The repository's tooling around the Hub model files: loading them as a package, the variant table and
checkpoint conversion. Nothing here is copied into a Hub repository."""
