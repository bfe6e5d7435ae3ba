"""The build: the stage table and its context, the output folder, manifest and stage keys, lock, preflight, torchrun."""
