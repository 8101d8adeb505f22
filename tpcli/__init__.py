"""tpcli: tensor parallelism for Hugging Face transformers, from the command line.

Importing `tpcli` is cheap (no torch, no transformers); `tpcli.load_model` is resolved lazily.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load_model", "load_state", "mesh_info", "save_state"]


def __getattr__(name: str):
    if name == "load_model":
        from tpcli.runtime.loading import load_model

        return load_model
    if name == "mesh_info":  # this rank's place on the job's mesh (tpcli.runtime.meshinfo)
        from tpcli.runtime.meshinfo import mesh_info

        return mesh_info
    if name in ("save_state", "load_state"):  # training state across meshes (tpcli.runtime.state)
        from tpcli.runtime import state

        return getattr(state, name)
    raise AttributeError(f"module 'tpcli' has no attribute {name!r}")
