"""peft-ladder: Ladder and xLadder side-network fine-tuning as a PEFT tuner type.

Importing this package registers the LADDER tuner with PEFT, so `get_peft_model(model, LadderConfig(...))`,
`PeftModel.from_pretrained` and the rest of PEFT's API work with Ladder adapters.
"""

from . import hub
from ._registration import LadderPeftType, register
from .config import LadderConfig
from .connections import ConnectionPlan, resolve_plan
from .model import LadderModel
from .side_network import LadderSideNetwork

__version__ = "0.1.0.dev0"

register(LadderConfig, LadderModel)
hub.install()

__all__ = ["LadderConfig", "LadderModel", "LadderPeftType", "LadderSideNetwork", "ConnectionPlan", "resolve_plan"]
