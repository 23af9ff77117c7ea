"""The one seam where peft-ladder extends PEFT's closed set of tuner types.

PEFT's `register_peft_method` only accepts members of its own `PeftType` enum, which cannot be subclassed or extended
without touching enum internals. Every lookup PEFT does is `MAPPING[config.peft_type]` on four plain dicts in
`peft.mapping`, and `PeftType` is a `(str, Enum)`, so a plugin-owned `(str, Enum)` member that compares equal to the
string "LADDER" fills the same slots and still behaves like PEFT's own values (`.value`, JSON round trip, `==`).
"""

from __future__ import annotations

import enum

LADDER_PREFIX = "ladder_"
MIN_PEFT_VERSION = "0.21.0"


class LadderPeftType(str, enum.Enum):
    """The PEFT type of Ladder adapters; equal to the string "LADDER" like PEFT's own `PeftType` members."""

    LADDER = "LADDER"

    def __str__(self) -> str:  # `PeftType` members print as their value; so does ours
        return self.value


def _check_peft_version() -> None:
    import peft
    from packaging.version import Version

    if Version(peft.__version__) < Version(MIN_PEFT_VERSION):
        raise ImportError(
            f"peft-ladder needs peft>={MIN_PEFT_VERSION} (found peft=={peft.__version__}): older PEFT cannot save a "
            f"third-party tuner's side network. Fix: pip install -U 'peft>={MIN_PEFT_VERSION}'"
        )


def register(config_cls: type, model_cls: type) -> None:
    """Make PEFT know the LADDER tuner. Idempotent; refuses to overwrite a LADDER entry owned by someone else."""
    _check_peft_version()
    from peft import mapping

    peft_type = LadderPeftType.LADDER
    tables = {
        "PEFT_TYPE_TO_CONFIG_MAPPING": config_cls,
        "PEFT_TYPE_TO_TUNER_MAPPING": model_cls,
        "PEFT_TYPE_TO_PREFIX_MAPPING": LADDER_PREFIX,
    }
    for table_name, ours in tables.items():
        current = getattr(mapping, table_name).get(peft_type)
        if current is not None and not _same_object(current, ours):
            raise RuntimeError(
                f"peft.mapping.{table_name}['LADDER'] is already taken by {current!r}, not peft-ladder's {ours!r}. "
                "Another package registered a tuner named LADDER; uninstall one of the two."
            )
    prefix_owners = [
        getattr(key, "value", key)
        for key, prefix in mapping.PEFT_TYPE_TO_PREFIX_MAPPING.items()
        if prefix == LADDER_PREFIX and key != peft_type
    ]
    if prefix_owners:
        raise RuntimeError(
            f"The parameter prefix {LADDER_PREFIX!r} is already used by PEFT type {prefix_owners[0]!r}; peft-ladder "
            "cannot share it (PEFT tells adapters apart by prefix). Uninstall the package that registered that type."
        )
    for table_name, ours in tables.items():
        getattr(mapping, table_name)[peft_type] = ours


def _same_object(current: object, ours: object) -> bool:
    # A module reloaded by a test runner or notebook re-creates the classes; the same qualified name is still ours.
    if current is ours or current == ours:
        return True
    return (
        isinstance(current, type)
        and isinstance(ours, type)
        and (f"{current.__module__}.{current.__qualname__}" == f"{ours.__module__}.{ours.__qualname__}")
    )
