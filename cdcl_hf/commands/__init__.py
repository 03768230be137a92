"""Command-line tools of cdcl-hf, as functions: each module has ``build_parser()`` and ``main(argv=None) -> int``."""
