"""The dependency window: which transformers and torch releases tpcli is tested with.

tpcli reads transformers' TP internals (plan resolution, weight converters, DCP layout), which move between minor
releases, all through the adapter modules named in `ADAPTERS` (tpcli/adapters/). pyproject allows newer releases so users are not locked out; at run time tpcli warns once when the
installed version is outside the tested window, and `moved_internal` turns an ImportError/AttributeError raised by
a moved internal into one line naming both versions. Versions are read from package metadata (no import).
"""

from __future__ import annotations

from importlib import metadata

from tpcli import __version__

# package -> (oldest tested, newest tested), compared on (major, minor)
TESTED = {"transformers": ("5.23", "5.24"), "torch": ("2.13", "2.15")}

# package -> the one tpcli module through which tpcli uses that package's private or unexported internals (written
# against the oldest release of TESTED; tests/test_adapters.py checks every wrapped name exists in the installed
# release, so `make test-newest` checks the newest). Every other tpcli module uses only the package's public API.
# huggingface_hub and safetensors are used through their public API only: no adapter.
ADAPTERS = {"transformers": "tpcli.adapters.transformers_api", "torch": "tpcli.adapters.torch_api"}


def _minor(version: str) -> tuple[int, int]:
    parts = (version.split("+")[0].split(".") + ["0"])[:2]
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts)  # type: ignore[return-value]


def installed(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _window(package: str) -> str:
    low, high = TESTED[package]
    return f"{package} {low}" if low == high else f"{package} {low}-{high}"


def untested() -> list[str]:
    """'transformers 5.30 (tested: transformers 5.23)' for each installed package outside its tested window."""
    out = []
    for package, (low, high) in TESTED.items():
        found = installed(package)
        if found and not (_minor(low) <= _minor(found) <= _minor(high)):
            out.append(f"{package} {found} (tested: {_window(package)})")
    return out


def warning() -> str | None:
    """The one-line warning to print when something installed is outside the tested window."""
    outside = untested()
    if not outside:
        return None
    return f"Warning: tpcli {__version__} is not tested with " + ", ".join(outside) + "; expect errors."


def moved_internal(exc: BaseException) -> str | None:
    """One line for an ImportError/AttributeError raised by (or about) transformers/torch internals while an
    untested version is installed; None otherwise (then it is a tpcli bug and the traceback is the useful report)."""
    if not isinstance(exc, ImportError | AttributeError) or not untested():
        return None
    about = f"{getattr(exc, 'name', '') or ''} {exc}"
    obj = getattr(exc, "obj", None)  # AttributeError.obj: the object that lacked the attribute
    owner = getattr(obj, "__name__", None) or type(obj).__module__ if obj is not None else ""
    if not any(p in f"{about} {owner}" for p in TESTED):
        return None
    found = ", ".join(f"{p} {installed(p)}" for p in TESTED if installed(p))
    tested = " and ".join(_window(p) for p in TESTED)
    return f"tpcli {__version__} is tested with {tested}; found {found}: {type(exc).__name__}: {exc}"
