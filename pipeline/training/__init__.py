"""Stage 2, shards -> a run: the vocabulary and its count tables, bags, row-wise optimizers, the epoch loop (one process or several), checkpoints and curves, the look-up artifacts."""
