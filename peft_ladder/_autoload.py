"""Register the LADDER tuner as soon as `peft` is imported, so adapters load without `import peft_ladder`.

PEFT has no plugin discovery: `PeftModel.from_pretrained` on a saved Ladder adapter in a process that never imported
peft_ladder fails with a bare `KeyError: 'LADDER'`. The wheel ships `peft_ladder_autoload.pth`, whose one line
`import _peft_ladder_autoload; _peft_ladder_autoload.install()` runs at interpreter start-up. `install()` puts a
finder at the head of `sys.meta_path` that waits for the first `import peft`, lets that import run normally, and only
after the top-level `peft` module has finished executing imports `peft_ladder` (which registers LADDER and imports
peft submodules itself).

The wheel ships this file as the top-level module `_peft_ladder_autoload` (pyproject.toml, `force-include`), not
inside the package: importing `peft_ladder._autoload` would run `peft_ladder/__init__.py` first, i.e. import torch
and peft in every Python process. An editable install holds a copy of it: reinstall after editing this file.

Start-up code must never break Python: nothing here imports torch or peft at start-up, every failure is swallowed
(at most a warning), and `PEFT_LADDER_NO_AUTOLOAD=1` turns the whole thing off.
"""

from __future__ import annotations

import os
import sys

OPT_OUT_VARIABLE = "PEFT_LADDER_NO_AUTOLOAD"


class _RegisterLadderAfterPeft:
    """A `sys.meta_path` finder that fires once, on the first `import peft`, and then removes itself."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        _remove_finder()
        try:
            import importlib.util

            spec = importlib.util.find_spec("peft")  # the normal search, now that this finder is gone
            _register_after_exec(spec.loader)
            return spec
        except Exception:  # peft not installed, or an unusual loader: let the normal import run (or fail) untouched
            return None


def _register_after_exec(loader) -> None:
    exec_module = loader.exec_module

    def exec_then_register(module):
        loader.exec_module = exec_module  # the loader is back to normal before anything else runs
        exec_module(module)  # `import peft` itself; its errors are the user's errors
        _import_plugin()

    loader.exec_module = exec_then_register


def _import_plugin() -> None:
    if "peft_ladder" in sys.modules:  # already imported, or being imported (it imports peft itself)
        return
    try:
        import peft_ladder  # noqa: F401  (registers LADDER with PEFT)
    except Exception as error:
        try:
            import warnings

            warnings.warn(
                f"peft-ladder could not register the LADDER tuner when peft was imported ({type(error).__name__}: "
                f"{error}). Loading Ladder adapters needs an explicit `import peft_ladder`; set "
                f"{OPT_OUT_VARIABLE}=1 to turn this automatic registration off.",
                RuntimeWarning,
                stacklevel=2,
            )
        except Exception:  # e.g. `-W error`: a failed plugin must still not break `import peft`
            pass


def _remove_finder() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _RegisterLadderAfterPeft)]


def install() -> None:
    """Arrange for `import peft_ladder` right after the first `import peft`. Never raises; safe to call twice."""
    try:
        if os.environ.get(OPT_OUT_VARIABLE, "").strip().lower() in ("1", "true", "yes"):
            return
        if "peft" in sys.modules:  # something imported peft before us: register now
            _import_plugin()
        elif not any(isinstance(finder, _RegisterLadderAfterPeft) for finder in sys.meta_path):
            sys.meta_path.insert(0, _RegisterLadderAfterPeft())
    except Exception:  # start-up code must not stop Python from starting
        pass
