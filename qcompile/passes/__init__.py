"""The compiler passes, one per file, each with a `verify`; the op table (`ops`) and the pipeline."""
