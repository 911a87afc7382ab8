"""Sparse-access memories (SAM, SDNC) and their nearest-neighbour search."""
