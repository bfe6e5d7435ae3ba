"""AMP itself: model families, Taylor importance, the per-block width search and the ragged rebuild (plain arguments, no files, no recipe)."""
