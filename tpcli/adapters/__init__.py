"""The one place tpcli touches private or unexported internals of the libraries it builds on.

transformers' TP machinery and torch's DTensor/DCP internals move between minor releases. Every use of a name
that starts with `_`, of a private attribute of a library object, or of a transformers function the package does
not export (`transformers.core_model_loading.*`, `transformers.distributed.tensor_parallel.*`, ...) goes through
one adapter module per library:

    tpcli.adapters.transformers_api   transformers' plan resolution, weight converters, TP styles, FP8 ops, ...
    tpcli.adapters.torch_api          DTensor's split and local tensor, `_StridedShard`, DCP's private helpers

so an upgrade that moves one of them breaks in one file, and `tpcli.versions.ADAPTERS` names each adapter with
the window of versions it is written against. huggingface_hub and safetensors are used through their public API
only (no adapter). tests/test_adapters.py fails when a module outside this package imports or reads a private
name of those libraries.

Adapters import nothing at module level besides the standard library: each wrapped name is imported when first
used (a module `__getattr__` for classes and functions, plain functions for attributes), so importing an adapter
costs no torch import and `tpcli --help` stays torch-free.
"""

import importlib


def lazy_internals(adapter: str, internals: dict[str, tuple[str, str, str]]):
    """The module `__getattr__` of an adapter: `internals[name]` = (library module, attribute, what it is), imported
    on first use. A release that moved it raises ImportError naming the library's module (what
    `versions.moved_internal` reports), not the adapter's."""

    def __getattr__(name: str):
        try:
            module, attr, _ = internals[name]
        except KeyError:
            raise AttributeError(f"module {adapter!r} has no attribute {name!r}") from None
        try:
            return getattr(importlib.import_module(module), attr)
        except AttributeError:
            raise ImportError(f"cannot import name {attr!r} from {module!r} (wrapped as {adapter}.{name})",
                              name=module) from None

    return __getattr__
