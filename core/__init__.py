"""Core and media layer: signal config, keys, the stage contract, atomic I/O, decoding.

It imports nothing else of the project, so every other package may build on it
(docs/architecture.md).
"""
