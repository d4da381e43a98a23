"""A/B evaluation of task heads: offline (two exported models on the same rows) and online (a traffic split in the
server, prediction logs joined with outcomes that arrive later)."""
