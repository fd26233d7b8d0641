"""Genomes compiled into Flax modules: cells, stem, head, whole networks; their
initialisers and the training loss."""
