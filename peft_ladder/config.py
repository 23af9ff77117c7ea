"""`LadderConfig`: the PEFT config of Ladder / xLadder side-network tuning."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field, fields
from typing import Literal, Optional, Union

import torch
from peft.config import PeftConfig

from ._registration import LadderPeftType
from .connections import PRESETS, check_sizes, normalize_connections
from .load_checks import CONFIG_NAME, read_config_json, saved_tensor_shapes, unknown_fields
from .options import check_config_kwargs
from .quantization import COMPUTE_DTYPES, KINDS, QUANT_TYPES, ComputeDtype, Kind, QuantType
from .side_init import SIDE_INITS, SideInit
from .side_network import FUSION_SCALES, FusionScale
from .taps import SAVED_TAPS, SavedTaps
from .tokens import TokenIndices, check_token_indices

GATES = ("sum", "learned")
# The saved format (adapter_config.json), raised whenever a default changes what a saved adapter computes:
# 1: 0.1.0.dev0, no `ladder_format_version` in the JSON, fusion_scale "rms".
# 2: `fusion_scale` and `ladder_format_version` recorded; new default fusion_scale "rms_gain".
# 3: format 2 with `trainable_token_indices` rows. Written only by adapters that have them, so that a format-2 reader
#    refuses such an adapter instead of loading it without its rows; every other adapter is still saved as format 2.
LADDER_FORMAT_VERSION = 3  # the newest format this version reads
BASE_FORMAT = 2  # what an adapter without token rows is saved as
TOKEN_ROWS_FORMAT = 3
LEGACY_FORMAT = {"ladder_format_version": 1, "fusion_scale": "rms"}  # what a JSON without the version meant
# Fields added after format 2 that change nothing a saved adapter computes, or that are off by default: written only
# when set, so that an adapter which does not use them stays readable by the peft-ladder versions before them.
UNWRITTEN_DEFAULTS = {"down_rank": None, "side_checkpointing": None, "saved_taps": "native", "mlp_chunk_size": None}


def _check_positive_int(name: str, value: object, expected: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be {expected}.")


def _listed(values: tuple[str, ...], last: str) -> str:
    """('a', 'b'), "None" -> "'a', 'b' or None": the accepted values as an error message lists them."""
    return ", ".join(map(repr, values)) + f" or {last}"


@dataclass
class LadderConfig(PeftConfig):
    """Configuration of a Ladder side network (Zheng, Cerisara et al., "Ladder Up, Memory Down", arXiv 2512.14237).

    The frozen backbone runs without gradients; a narrow side network of `side_layers` blocks, fed by down-projected
    backbone hidden states, is up-projected and added to the last decoder layer's output before the final norm.

    Example:

    ```py
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> from peft import get_peft_model
    >>> from peft_ladder import LadderConfig
    >>> base = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=64, intermediate_size=128,
    ...     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, vocab_size=128))
    >>> model = get_peft_model(base, LadderConfig(task_type="CAUSAL_LM", reduction_factor=4, connections="xladder"))
    >>> model.print_trainable_parameters()  # doctest: +ELLIPSIS
    trainable params: ...
    ```
    """

    # --- side network shape -----------------------------------------------------------------------------------------
    reduction_factor: int = field(
        default=8,
        metadata={
            "help": "Side width = backbone hidden size / reduction_factor (r in the paper: 8 in LST, 16 in QST). "
            "Must divide the hidden size."
        },
    )
    side_layers: Optional[int] = field(
        default=None,
        metadata={
            "help": "Number of side blocks. Default: one per backbone layer for the presets (the paper's fully "
            "connected ladder), or the highest side block of an explicit map + 1."
        },
    )
    connections: Union[Literal["ladder", "xladder"], dict[int, int]] = field(
        default="ladder",
        metadata={
            "help": "'ladder': backbone layer i feeds side block i. 'xladder': the last xladder_depth backbone layers "
            "feed the first xladder_depth side blocks, the remaining blocks add depth. Or an explicit "
            "{backbone_layer: side_block} dict, 0-based as in model.model.layers[i]."
        },
    )
    xladder_depth: Optional[int] = field(
        default=None,
        metadata={"help": "xLadder's delta: how many final backbone layers are connected. Default: side_layers // 2."},
    )
    down_rank: Optional[int] = field(
        default=None,
        metadata={
            "help": "Rank k of low-rank down-projections (QST's d -> k -> d_s): each tap is projected by "
            "Linear(d, k, bias=False) then Linear(k, d_s): at Llama-3.1-70B and r=8, k=16 gives 12M down-projection "
            "parameters instead of 680M. Must be below the side width d_s. None (default): a full Linear(d, d_s)."
        },
    )
    # --- mixing and fusion --------------------------------------------------------------------------------------------
    gate: Union[Literal["sum", "learned"], float] = field(
        default="sum",
        metadata={
            "help": "How a side block's input mixes the side stream s with the projected tap t: 'sum' (s + t, the "
            "paper's unweighted gated sum), 'learned' (mu*s + (1-mu)*t, mu = sigmoid(a / gate_temperature), a=0 at "
            "init, as in LST) or a float alpha in [0, 1] (alpha*s + (1-alpha)*t)."
        },
    )
    gate_temperature: float = field(
        default=0.1, metadata={"help": "Temperature T of the learned gate mu = sigmoid(a / T) (LST uses 0.1)."}
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: the up-projection starts at zero, so a fresh adapter reproduces the base model exactly. "
            "False: random up-projection (a non-identity adapter, for tests)."
        },
    )
    # --- side network initialisation (side_init.py) ---------------------------------------------------------------
    side_init: SideInit = field(
        default="default",
        metadata={
            "help": "How the side blocks start. 'default': PyTorch's init of the decoder-layer class. 'magnitude': "
            "each side block is its backbone layer pruned to the side width (residual dims, attention heads, MLP "
            "neurons ranked by weight magnitude, as LST), and the down-projections select the kept dims. 'fisher': "
            "the same ranked by Fisher importance; call peft_ladder.initialize_side_fisher(model, batches) after "
            "get_peft_model (training before it raises). Float backbones only. The up-projection stays zero."
        },
    )
    # --- fusion scale and saved format (docs/defaults.md, "Backbones with outliers") ---------------------------------
    fusion_scale: FusionScale = field(
        default="rms_gain",
        metadata={
            "help": "What the side output is multiplied by before it is added to h_L: 'rms_gain' (default) the "
            "per-token RMS of h_L times min(1, median|g| / |g_k|) for the final norm's gain g, so dimensions whose "
            "gain is far above the typical one (Gemma's 1 + w) take no outsized steps; 'rms' the per-token RMS alone "
            "(format 1, peft-ladder 0.1.0.dev0, which adapters saved then load with)."
        },
    )
    peft_ladder_version: Optional[str] = field(
        default=None,
        metadata={"help": "The peft-ladder version that created the config (filled in); named in format errors."},
    )
    ladder_format_version: Optional[int] = field(
        default=None,
        metadata={
            "help": "Format of the saved adapter, written by save_pretrained. A saved config without it is format 1 "
            "and loads with that format's defaults (fusion_scale='rms'); a newer format than this peft-ladder reads "
            "raises an error naming the peft-ladder version that wrote it. Not meant to be set by hand."
        },
    )
    # --- backbone quantization (QST; docs/how-to/quantized-backbone.md) -----------------------------------------------
    quantization: Optional[Kind] = field(
        default=None,
        metadata={
            "help": "Quantize the frozen backbone's decoder linear layers in place with bitsandbytes, as "
            "from_pretrained(..., quantization_config=BitsAndBytesConfig(...)) would: '4bit' (Linear4bit, QLoRA's "
            "recipe) or '8bit' (Linear8bitLt, the paper's math runs). Embeddings, norms and the LM head stay float; "
            "the side network trains in float. None: keep the backbone as it is. A model already loaded in 4/8-bit is "
            "recorded here, so a saved adapter is reloaded on the same backbone. Needs pip install 'peft-ladder[bnb]'."
        },
    )
    bnb_4bit_quant_type: QuantType = field(
        default="nf4", metadata={"help": "4-bit data type: 'nf4' (NormalFloat, QLoRA) or 'fp4'. Only for '4bit'."}
    )
    bnb_4bit_compute_dtype: Optional[ComputeDtype] = field(
        default=None,
        metadata={
            "help": "Dtype the 4-bit matmuls run in, as a string (JSON-safe); a torch.dtype is accepted and stored "
            "as its name. None: the backbone's own float dtype, resolved and saved when the adapter is created."
        },
    )
    bnb_4bit_use_double_quant: bool = field(
        default=True,
        metadata={
            "help": "Also quantize the 4-bit quantization constants (QLoRA's double quantization). Only for '4bit'."
        },
    )
    # --- training memory (docs/benchmarks.md) -----------------------------------------------------------------------
    loss_chunk_size: Optional[int] = field(
        default=256,
        metadata={
            "help": "Causal-LM training (train mode, grad enabled) with labels computes the loss over chunks of this "
            "many tokens without building the full (tokens x vocab) logits, the largest activation left once the "
            "backbone is out of the backward pass; same loss and gradients as transformers' loss. The output's "
            "`logits` is then None (LadderChunkedLossOutput). Eval mode, no_grad, calls without labels and TRL's "
            "fused LM head are unchanged. None: always use the model's own loss and logits."
        },
    )
    side_checkpointing: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Recompute the side blocks in backward (non-reentrant torch.utils.checkpoint) instead of keeping "
            "their activations: about one more side forward per step, much less memory. Only the side blocks rerun, "
            "never the backbone. None (default): whenever the side network trains (train mode, grad enabled) and has "
            "2 or more blocks. True: whenever it trains. False: never. Decides alone: the backbone's gradient "
            "checkpointing (Trainer's gradient_checkpointing=True) changes nothing for Ladder."
        },
    )
    saved_taps: SavedTaps = field(
        default="native",
        metadata={
            "help": "How each trainable down-projection keeps its tap (a backbone hidden state) for its weight "
            "gradient (taps.py): 'native' (default) the tap itself at the backbone's precision, no fp32 copy, exact; "
            "'int8' int8 codes with a per-token absmax scale (about half of bf16, a small gradient error); 'cpu' a "
            "pinned CPU copy made during the forward and brought back in backward (CUDA only)."
        },
    )
    mlp_chunk_size: Optional[int] = field(
        default=None,
        metadata={
            "help": "Run each frozen backbone layer's MLP (its `mlp` module) over chunks of this many tokens of the "
            "sequence, one chunk after the other: the same outputs (an MLP acts on each token alone), and at long "
            "context the forward holds (chunk x intermediate) instead of (tokens x intermediate) MLP activations, "
            "three at once. For decoders and encoders whose layers have an `mlp` module (Llama, Qwen, Mistral, Gemma, "
            "GPT-2, ModernBERT). None (default): no chunking."
        },
    )
    # --- new tokens (tokens.py; docs/how-to/training.md, "New tokens") ---------------------------------------------
    trainable_token_indices: Optional[TokenIndices] = field(
        default=None,
        metadata={
            "help": "Token ids to train without training the embedding matrix, e.g. tokens a tokenizer added "
            "(LoRA's field of the same name; TRL fills it when cloning a chat template adds tokens). A list of ids "
            "or {module_name: [ids]} naming the input embedding (e.g. 'embed_tokens') or the LM head ('lm_head'). "
            "The side network holds trainable rows, zero at init: ids of the input embedding get rows added to the "
            "side stream's input (where the embedding is read) and rows added to the LM head after the fusion; ids "
            "under the LM head's name get head rows only. Only the rows are saved."
        },
    )
    # --- PEFT plumbing ------------------------------------------------------------------------------------------------
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Extra base-model modules to train and save, e.g. a new classification head. PEFT fills "
            "['classifier', 'score'] for SEQ_CLS."
        },
    )

    # Ladder finds its target modules (every decoder layer and the final norm) itself; PEFT reads this attribute.
    target_modules = None
    # (folder, {key: shape}) of the weights `from_pretrained` found next to the config, until the tuner has compared
    # them with the side network it builds (load_checks.py). Not a field: never saved.
    saved_weights = None

    def __new__(cls, *args, **kwargs):
        # LoraConfig-only keywords: a TypeError saying what to use instead, not the dataclass's bare one.
        check_config_kwargs(kwargs)
        # PEFT drops adapter_config.json fields that a config class does not know, with a warning (peft config.py,
        # `from_peft_type`); a Ladder field dropped that way would change what the adapter computes. Refuse instead.
        message = unknown_fields({f.name for f in fields(cls)}, kwargs)
        if message:
            raise TypeError(message)
        return super().__new__(cls)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """PEFT's `from_pretrained` (which `PeftModel.from_pretrained` and `load_adapter` call before they touch the
        model), failing on a local folder's damaged or invalid files with the file's name (load_checks.py)."""
        folder = os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
        config_file = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(config_file):  # on the Hub: PEFT downloads and reads it
            return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        read_config_json(config_file)
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except (TypeError, ValueError) as error:
            if type(error) not in (TypeError, ValueError):
                raise
            raise type(error)(f"{config_file}: {error}") from error
        shapes = saved_tensor_shapes(folder)
        config.saved_weights = None if shapes is None else (folder, shapes)
        return config

    def __post_init__(self) -> None:
        # A saved adapter_config.json always carries `peft_type`; a config written in code does not. A saved config
        # without `ladder_format_version` predates formats and keeps what it computed then (LEGACY_FORMAT), whichever
        # PEFT path builds it (PeftModel/PeftConfig/LadderConfig.from_pretrained, AutoPeftModel, load_adapter).
        if self.ladder_format_version is None:
            if self.peft_type is not None:
                for name, value in LEGACY_FORMAT.items():
                    setattr(self, name, value)
            else:
                self.ladder_format_version = BASE_FORMAT
        super().__post_init__()
        self.peft_type = LadderPeftType.LADDER
        self._validate_format()
        self._validate()

    def to_dict(self) -> dict:
        # TRL sets trainable_token_indices after the config is built: the saved format follows what is saved.
        saved = super().to_dict()
        # Fields not written at their defaults: peft-ladder versions before them still read such a file.
        for name, default in UNWRITTEN_DEFAULTS.items():
            if name in saved and saved[name] == default:
                del saved[name]
        if saved.get("trainable_token_indices") and saved["ladder_format_version"] < TOKEN_ROWS_FORMAT:
            saved["ladder_format_version"] = TOKEN_ROWS_FORMAT
        return saved

    def _validate_format(self) -> None:
        from . import __version__

        version = self.ladder_format_version
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(
                f"ladder_format_version={version!r} must be a positive integer (1 to {LADDER_FORMAT_VERSION}); "
                "it is written by save_pretrained, leave it unset."
            )
        if version > LADDER_FORMAT_VERSION:
            writer = self.peft_ladder_version or "a newer version"
            raise ValueError(
                f"ladder_format_version={version}: this Ladder adapter was saved in format {version} by peft-ladder "
                f"{writer}; peft-ladder "
                f"{__version__} reads formats 1 to {LADDER_FORMAT_VERSION}. Upgrade to read it: pip install -U "
                f"'peft-ladder>={writer}'."
                if self.peft_ladder_version
                else f"ladder_format_version={version}: this Ladder adapter was saved in format {version}; peft-ladder "
                f"{__version__} reads formats 1 "
                f"to {LADDER_FORMAT_VERSION}. Upgrade to read it: pip install -U peft-ladder."
            )
        if self.peft_ladder_version is None and version >= BASE_FORMAT:
            self.peft_ladder_version = __version__
        if self.fusion_scale not in FUSION_SCALES:
            raise ValueError(
                f"fusion_scale={self.fusion_scale!r} is unknown; use 'rms_gain' (the default) or 'rms' (format 1)."
            )

    def _validate(self) -> None:
        _check_positive_int(
            "reduction_factor",
            self.reduction_factor,
            "a positive integer dividing the hidden size, e.g. 8 (LST) or 16 (QST)",
        )
        if self.side_layers is not None:
            _check_positive_int("side_layers", self.side_layers, "a positive integer or None (one per layer)")
        self.connections = normalize_connections(self.connections)
        if self.xladder_depth is not None:
            if self.connections != "xladder":
                raise ValueError(
                    f"xladder_depth={self.xladder_depth} only applies to connections='xladder' (got "
                    f"connections={self.connections!r}); remove xladder_depth or use the xladder preset."
                )
            _check_positive_int("xladder_depth", self.xladder_depth, "a positive integer")
        check_sizes(self.connections, self.side_layers, self.xladder_depth)
        if self.down_rank is not None:
            _check_positive_int(
                "down_rank", self.down_rank, "a positive integer below the side width (e.g. 16, as QST) or None"
            )
        if isinstance(self.gate, str):
            if self.gate not in GATES:
                raise ValueError(f"gate={self.gate!r} is unknown; use 'sum', 'learned' or a float weight in [0, 1].")
        elif isinstance(self.gate, bool) or not isinstance(self.gate, numbers.Real) or not 0.0 <= self.gate <= 1.0:
            raise ValueError(f"gate={self.gate!r} must be 'sum', 'learned' or a float weight in [0, 1], e.g. 0.5.")
        temperature = self.gate_temperature
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not 0 < temperature < math.inf:
            raise ValueError(f"gate_temperature={temperature!r} must be a positive number (finite), e.g. 0.1.")
        if self.loss_chunk_size is not None:
            _check_positive_int(
                "loss_chunk_size",
                self.loss_chunk_size,
                "a positive number of tokens (e.g. 256) or None (the model's own loss, with logits)",
            )
        self._validate_flags()
        self._validate_memory_options()
        self._validate_quantization()
        self._validate_side_init()
        check_token_indices(self.trainable_token_indices)

    def _validate_flags(self) -> None:
        for name in ("init_weights", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False.")
        if self.peft_ladder_version is not None and not isinstance(self.peft_ladder_version, str):
            raise ValueError(
                f"peft_ladder_version={self.peft_ladder_version!r} must be a version string or None; it is filled in "
                "when the config is created, leave it unset."
            )
        modules = self.modules_to_save
        if isinstance(modules, str):
            raise ValueError(
                f"modules_to_save={modules!r} is a string; give a list of module names: modules_to_save=[{modules!r}]."
            )
        if modules is not None and (
            not isinstance(modules, (list, tuple)) or not all(isinstance(m, str) and m for m in modules)
        ):
            raise ValueError(f"modules_to_save={modules!r} must be None or a list of module names, e.g. ['score'].")

    def _validate_memory_options(self) -> None:
        if self.side_checkpointing is not None and not isinstance(self.side_checkpointing, bool):
            raise ValueError(
                f"side_checkpointing={self.side_checkpointing!r} must be None (checkpoint the side blocks whenever "
                "that lowers the peak), True or False."
            )
        if self.mlp_chunk_size is not None:
            _check_positive_int(
                "mlp_chunk_size", self.mlp_chunk_size, "a positive number of tokens (e.g. 1024) or None"
            )
        if self.saved_taps not in SAVED_TAPS:
            raise ValueError(
                f"saved_taps={self.saved_taps!r} is unknown; use 'native' (the default: taps at the backbone's "
                "precision), 'int8' (per-token 8-bit) or 'cpu' (offloaded to pinned CPU memory, CUDA only)."
            )

    def _validate_side_init(self) -> None:
        if self.side_init not in SIDE_INITS:
            raise ValueError(
                f"side_init={self.side_init!r} is unknown; use 'default' (PyTorch's init), 'magnitude' (prune the "
                "backbone by weight magnitude) or 'fisher' (by Fisher importance, then call "
                "peft_ladder.initialize_side_fisher(model, batches))."
            )
        if self.side_init != "default" and self.down_rank is not None:
            raise ValueError(
                f"side_init={self.side_init!r} with down_rank={self.down_rank}: pruned init makes each down-projection "
                "a selection of the side width's kept dims (rank d_s), which a rank-"
                f"{self.down_rank} down-projection cannot hold. Use side_init='default' with down_rank, or "
                "down_rank=None with pruned init."
            )

    def _validate_quantization(self) -> None:
        if self.quantization is not None and self.quantization not in KINDS:
            raise ValueError(
                f"quantization={self.quantization!r} is unknown; use {_listed(KINDS, 'None')} (no quantization)."
            )
        if self.bnb_4bit_quant_type not in QUANT_TYPES:
            raise ValueError(
                f"bnb_4bit_quant_type={self.bnb_4bit_quant_type!r} is unknown; use "
                f"{_listed(QUANT_TYPES[:-1], repr(QUANT_TYPES[-1]))}."
            )
        given = self.bnb_4bit_compute_dtype
        dtype = str(given).removeprefix("torch.") if isinstance(given, torch.dtype) else given  # torch.bfloat16
        if dtype is not None and dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"bnb_4bit_compute_dtype={given!r} is not a float dtype bitsandbytes computes in; use "
                f"{_listed(COMPUTE_DTYPES, 'None')} (the backbone's dtype)."
            )
        self.bnb_4bit_compute_dtype = dtype
        if not isinstance(self.bnb_4bit_use_double_quant, bool):
            raise ValueError(f"bnb_4bit_use_double_quant={self.bnb_4bit_use_double_quant!r} must be True or False.")


__all__ = ["LadderConfig", "PRESETS"]
