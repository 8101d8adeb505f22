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
