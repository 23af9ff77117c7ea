"""peft-ladder: Ladder and xLadder side-network fine-tuning as a PEFT tuner type.

Importing this package registers the LADDER tuner with PEFT, so `get_peft_model(model, LadderConfig(...))`,
`PeftModel.from_pretrained` and the rest of PEFT's API work with Ladder adapters.
"""

import sys

__version__ = "0.1.0.dev0"


def _running_the_planner() -> bool:
    # `python -m peft_ladder.planner` plans from a config alone and never calls PEFT. Registering would import PEFT
    # and, through it, bitsandbytes (seconds of start-up and warnings about CPU kernels). While `-m` locates its
    # module, which imports this package, Python sets sys.argv[0] to "-m" (documented under `python -m`);
    # sys.orig_argv names the module. Every other import of this package registers.
    if getattr(sys, "argv", [])[:1] != ["-m"]:
        return False
    return any(arg in ("peft_ladder.planner", "-mpeft_ladder.planner") for arg in getattr(sys, "orig_argv", []))


if not _running_the_planner():
    from . import hub, load_checks, options
    from ._registration import LadderPeftType, register
    from .checkpoints import IncompleteCheckpointWarning, last_complete_checkpoint
    from .config import LadderConfig
    from .connections import ConnectionPlan, resolve_plan
    from .model import LadderModel
    from .side_init import initialize_side_fisher
    from .side_network import LadderSideNetwork

    register(LadderConfig, LadderModel)
    hub.install()
    options.install()
    load_checks.install()

__all__ = [
    "LadderConfig",
    "LadderModel",
    "LadderPeftType",
    "LadderSideNetwork",
    "ConnectionPlan",
    "resolve_plan",
    "initialize_side_fisher",
    "last_complete_checkpoint",
    "IncompleteCheckpointWarning",
]
