"""The model as a file and as a graph: load, save, memory-mapped weights, export, sessions."""
