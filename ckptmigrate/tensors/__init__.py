"""Tensors without their bytes: references into a container, deferred results of ops, and the lazy
state dict built from them. Everything above reads keys, shapes and dtypes from here."""
