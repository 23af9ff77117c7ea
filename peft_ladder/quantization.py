"""Quantized backbones (QST): the only module that imports bitsandbytes, and only when a quantized backbone is used.

Ladder on a 4/8-bit backbone is QST (Quantized Side Tuning): the weights (M1) shrink as with QLoRA, while the
activations (M3) stay as small as the side path, since the backbone runs without grad.

Two ways in, one result. `LadderConfig(quantization="4bit" | "8bit")` quantizes a full-precision backbone in place
with transformers' own bitsandbytes quantizer (the code `from_pretrained(..., quantization_config=
BitsAndBytesConfig(...))` runs), so the model afterwards is exactly what that loading would have produced: decoder
linear layers become `bnb.nn.Linear4bit` / `Linear8bitLt`, the LM head (and tied or last modules), embeddings and norms
stay float, and `is_loaded_in_4bit`, `hf_quantizer` and `config.quantization_config` are set. A model already loaded
that way (QLoRA path) is left as it is, and what it is gets written into the adapter's config, so a saved adapter
always says which backbone it was trained on and is reloaded on the same one.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from typing import Any, Literal, Optional, get_args

import torch
from peft.utils.integrations import skip_init_on_device
from torch import nn

MIN_BITSANDBYTES = "0.48"
INSTALL_HINT = f"pip install 'peft-ladder[bnb]'  (or: pip install 'bitsandbytes>={MIN_BITSANDBYTES}')"
# The values LadderConfig accepts (its field types and its validation use these).
Kind = Literal["4bit", "8bit"]
QuantType = Literal["nf4", "fp4"]
ComputeDtype = Literal["float32", "bfloat16", "float16"]
KINDS: tuple[str, ...] = get_args(Kind)
QUANT_TYPES: tuple[str, ...] = get_args(QuantType)
COMPUTE_DTYPES: tuple[str, ...] = get_args(ComputeDtype)
# The fields of LadderConfig that describe the backbone's quantization (what is compared and recorded).
FIELDS = ("quantization", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype")


class LadderQuantizationWarning(UserWarning):
    """Ladder changed the backbone's precision in place (or will run it at another compute dtype)."""


# --- the optional dependency ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def bitsandbytes_version() -> Optional[str]:
    """The installed bitsandbytes version, or None when it cannot be imported (cached: probed once per process)."""
    try:
        module = importlib.import_module("bitsandbytes")
    except Exception:  # ImportError, or a broken native library raising at import
        return None
    return getattr(module, "__version__", "0")


def is_bitsandbytes_available() -> bool:
    from packaging.version import Version

    version = bitsandbytes_version()
    return version is not None and Version(version) >= Version(MIN_BITSANDBYTES)


def require_bitsandbytes(option: str):
    """Import bitsandbytes for `option` (e.g. "quantization='4bit'"), or raise an ImportError with the fix."""
    version = bitsandbytes_version()
    if version is None:
        raise ImportError(
            f"LadderConfig({option}) needs the bitsandbytes package, which is not installed. Run: "
            f"{INSTALL_HINT}, or set quantization=None to keep the backbone in full precision."
        )
    if not is_bitsandbytes_available():
        raise ImportError(
            f"LadderConfig({option}) needs bitsandbytes>={MIN_BITSANDBYTES}; found {version}. Run: {INSTALL_HINT}."
        )
    return importlib.import_module("bitsandbytes")


@functools.lru_cache(maxsize=None)
def _kind_error(kind: str, quant_type: str, device_type: str) -> Optional[str]:
    """Run one tiny real bitsandbytes layer of `kind` on `device_type`: the platform check no version table gives."""
    import bitsandbytes as bnb

    if device_type not in getattr(bnb, "supported_torch_devices", {device_type}):
        return f"bitsandbytes {bnb.__version__} supports the devices {sorted(bnb.supported_torch_devices)}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "4bit":
                layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type=quant_type)
            else:
                layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
            layer = layer.to(device_type)
            with torch.no_grad():
                layer(torch.ones(1, 64, device=device_type))
    except Exception as error:  # the backend's own message says what is missing
        return f"{type(error).__name__}: {error}"
    return None


def check_kind_available(kind: str, quant_type: str, device: torch.device) -> None:
    """Raise a ValueError naming the option and the alternatives if `kind` cannot run on `device` here."""
    option = f"quantization={kind!r}" + (f", bnb_4bit_quant_type={quant_type!r}" if kind == "4bit" else "")
    require_bitsandbytes(option)
    error = _kind_error(kind, quant_type, device.type)
    if error is not None:
        other = "8bit" if kind == "4bit" else "4bit"
        raise ValueError(
            f"LadderConfig({option}) is not available on device {device.type!r} with this bitsandbytes ({error}). "
            f"Use quantization={other!r} or quantization=None, move the model to a supported device first, or "
            f"upgrade: {INSTALL_HINT}."
        )


# --- what a backbone is -----------------------------------------------------------------------------------------------


def describe(model: nn.Module) -> Optional[dict[str, Any]]:
    """The bitsandbytes quantization of `model`'s linear layers as LadderConfig fields, or None if it has none.

    Read from the layers themselves, not from `config.quantization_config`, which a user can set or drop freely.
    """
    import sys

    bnb = sys.modules.get("bitsandbytes")  # a model cannot hold bnb layers if bnb was never imported
    if bnb is None:
        return None
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            compute = module.compute_dtype or torch.float32
            return {
                "quantization": "4bit",
                "bnb_4bit_quant_type": weight.quant_type,
                "bnb_4bit_use_double_quant": bool(weight.compress_statistics),
                "bnb_4bit_compute_dtype": str(compute).removeprefix("torch."),
            }
        if isinstance(module, bnb.nn.Linear8bitLt):
            return {"quantization": "8bit"}
    return None


def other_quantization(model: nn.Module) -> Optional[str]:
    """The name of a non-bitsandbytes quantization method the model was loaded with (gptq, awq, ...), if any."""
    method = getattr(model, "quantization_method", None)
    method = getattr(method, "value", method)
    return method if getattr(model, "is_quantized", False) and method != "bitsandbytes" else None


def as_bitsandbytes_config(fields: dict[str, Any]):
    """The `transformers.BitsAndBytesConfig` equivalent to LadderConfig's quantization fields."""
    from transformers import BitsAndBytesConfig

    if fields["quantization"] == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=fields["bnb_4bit_quant_type"],
        bnb_4bit_use_double_quant=fields["bnb_4bit_use_double_quant"],
        bnb_4bit_compute_dtype=getattr(torch, fields["bnb_4bit_compute_dtype"]),
    )


def _config_repr(fields: dict[str, Any]) -> str:
    if fields["quantization"] == "8bit":
        return "BitsAndBytesConfig(load_in_8bit=True)"
    return (
        f"BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type={fields['bnb_4bit_quant_type']!r}, "
        f"bnb_4bit_use_double_quant={fields['bnb_4bit_use_double_quant']}, "
        f"bnb_4bit_compute_dtype=torch.{fields['bnb_4bit_compute_dtype']})"
    )


def _requested(config) -> dict[str, Any]:
    return {name: getattr(config, name) for name in FIELDS}


# --- the one entry point the tuner calls ------------------------------------------------------------------------------


def prepare_backbone(model: nn.Module, config) -> None:
    """Make `model`'s backbone what `config` says (quantizing a full-precision one), or record what it already is.

    Called for every adapter before any module is wrapped; everything is checked before the model is touched.
    """
    present = describe(model)
    if config.quantization is None:
        if present is not None:  # QLoRA path: the adapter remembers the backbone it is trained on
            for name, value in present.items():
                setattr(config, name, value)
        return
    other = other_quantization(model)
    if other is not None:
        raise ValueError(
            f"LadderConfig(quantization={config.quantization!r}) quantizes a full-precision backbone, but this model "
            f"is already quantized with {other!r}. Set quantization=None to train Ladder on it as it is."
        )
    if present is None:
        fields = _requested(config)
        fields["bnb_4bit_compute_dtype"] = fields["bnb_4bit_compute_dtype"] or _float_dtype_name(model)
        quantize_in_place(model, fields)
        if fields["quantization"] == "4bit":
            config.bnb_4bit_compute_dtype = fields["bnb_4bit_compute_dtype"]  # the resolved default is saved
        return
    _check_same(present, config)


def _check_same(present: dict[str, Any], config) -> None:
    wanted = _requested(config)
    keys = ("quantization",) if present["quantization"] == "8bit" else FIELDS[:3]
    if any(present[key] != wanted[key] for key in keys):
        if wanted["quantization"] == "4bit":
            wanted["bnb_4bit_compute_dtype"] = wanted["bnb_4bit_compute_dtype"] or present.get(
                "bnb_4bit_compute_dtype", "float32"
            )
        raise ValueError(
            f"The adapter's LadderConfig asks for a backbone quantized as {_config_repr(wanted)}, but the base model "
            f"is already quantized as {_config_repr(present)}, and quantized weights cannot be re-quantized. Load "
            f"the base model with quantization_config={_config_repr(wanted)}, or in full precision (Ladder then "
            "quantizes it as the adapter says); or, to use this backbone anyway, pass a config with "
            "quantization=None: `config = PeftConfig.from_pretrained(path); config.quantization = None; "
            "PeftModel.from_pretrained(model, path, config=config)`."
        )
    if present["quantization"] == "4bit" and wanted["bnb_4bit_compute_dtype"] != present["bnb_4bit_compute_dtype"]:
        if wanted["bnb_4bit_compute_dtype"] is not None:
            warnings.warn(
                f"LadderConfig(bnb_4bit_compute_dtype={wanted['bnb_4bit_compute_dtype']!r}) differs from the "
                f"backbone's compute dtype {present['bnb_4bit_compute_dtype']!r}: the 4-bit weights are the same, "
                "the matmuls run at the backbone's precision. To match, load the base with "
                f"BitsAndBytesConfig(..., bnb_4bit_compute_dtype=torch.{wanted['bnb_4bit_compute_dtype']}).",
                LadderQuantizationWarning,
                stacklevel=3,
            )
        config.bnb_4bit_compute_dtype = present["bnb_4bit_compute_dtype"]  # record what actually runs


# --- quantizing in place, as from_pretrained(quantization_config=...) would ---------------------------------------


@skip_init_on_device  # PeftModel.from_pretrained(low_cpu_mem_usage=True) would otherwise put the new weights on meta
def quantize_in_place(model: nn.Module, fields: dict[str, Any]) -> None:
    """Quantize `model`'s linear layers with transformers' bitsandbytes quantizer; on any error, undo everything."""
    from transformers import PreTrainedModel
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers import AutoHfQuantizer

    kind = fields["quantization"]
    option = f"quantization={kind!r}"
    if not isinstance(model, PreTrainedModel):
        raise ValueError(
            f"LadderConfig({option}) quantizes transformers models (PreTrainedModel); got "
            f"{type(model).__name__}. Quantize it yourself, or set quantization=None."
        )
    _check_no_adapters(model, option)
    device = _single_device(model, option)
    check_kind_available(kind, fields["bnb_4bit_quant_type"], device)
    candidates = {name: m for name, m in model.named_modules() if type(m) is nn.Linear or isinstance(m, Conv1D)}
    _check_weights(candidates, option)

    quantizer = AutoHfQuantizer.from_config(as_bitsandbytes_config(fields), pre_quantized=False)
    quantizer.validate_environment(device_map={"": device})
    undo = _Snapshot(model, candidates)
    try:
        quantizer.preprocess_model(model=model, dtype=model.dtype, device_map={"": device})
        quantize = quantizer.get_quantize_ops()
        replaced = [
            name for name, module in model.named_modules() if name in candidates and module is not candidates[name]
        ]
        for name in replaced:
            module, original = model.get_submodule(name), candidates[name]
            module.train(original.training)  # new modules start in training mode; bnb's kernels differ by mode
            key = f"{name}.weight"
            module.weight = quantize.convert({key: original.weight.detach()}, model=model, full_layer_name=key)[key]
            if original.bias is not None:
                module.bias = nn.Parameter(original.bias.detach(), requires_grad=False)
        model.hf_quantizer = quantizer
        quantizer.postprocess_model(model)
    except BaseException:
        undo.restore()
        raise
    kept = sorted(set(quantizer.modules_to_not_convert))
    warnings.warn(
        f"Ladder quantized the backbone in place as from_pretrained(..., quantization_config="
        f"{_config_repr(fields)}) would: {len(replaced)} linear layers are now bitsandbytes {kind} layers; "
        f"embeddings, norms and {kept} stay {str(model.dtype).removeprefix('torch.')}. The model object passed in is "
        "changed. To keep a full-precision backbone, set quantization=None (for a saved adapter: `config = "
        "PeftConfig.from_pretrained(path); config.quantization = None; PeftModel.from_pretrained(model, path, "
        "config=config)`).",
        LadderQuantizationWarning,
        stacklevel=4,
    )


class _Snapshot:
    """What `quantize_in_place` changes: the replaced linear modules and the attributes transformers' quantizer sets."""

    _MODEL_ATTRS = ("is_quantized", "quantization_method", "hf_quantizer", "is_loaded_in_4bit", "is_loaded_in_8bit")
    _CONFIG_ATTRS = ("quantization_config", "_is_quantized")

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module]) -> None:
        from transformers import PreTrainedModel

        self.model, self.modules = model, dict(modules)
        self.model_attrs = {name: model.__dict__.get(name, _MISSING) for name in self._MODEL_ATTRS}
        self.configs = [
            (m.config, {name: m.config.__dict__.get(name, _MISSING) for name in self._CONFIG_ATTRS})
            for m in model.modules()
            if isinstance(m, PreTrainedModel)
        ]

    def restore(self) -> None:
        for name, module in self.modules.items():
            if self.model.get_submodule(name) is not module:
                self.model.set_submodule(name, module)
        for target, attrs in [(self.model, self.model_attrs), *self.configs]:
            for name, value in attrs.items():
                if value is _MISSING:
                    target.__dict__.pop(name, None)
                else:
                    target.__dict__[name] = value


_MISSING = object()


def _check_no_adapters(model: nn.Module, option: str) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError(
            f"LadderConfig({option}) can only quantize a backbone that has no adapters yet: this model already "
            "carries one, which was set up on the full-precision weights. Put the quantization on the first adapter, "
            "or load the base with a BitsAndBytesConfig, or set quantization=None for this adapter."
        )


def _single_device(model: nn.Module, option: str) -> torch.device:
    devices = {p.device for p in model.parameters()}
    if any(d.type == "meta" for d in devices):
        raise ValueError(
            f"LadderConfig({option}) needs the backbone's weights, but some are on the 'meta' device. "
            "Load the weights first, or load the model with from_pretrained(..., quantization_config="
            "BitsAndBytesConfig(...)) and set quantization=None."
        )
    if len(devices) != 1 or len(set(getattr(model, "hf_device_map", {"": 0}).values())) > 1:
        raise ValueError(
            f"LadderConfig({option}) quantizes a model on one device; this one is spread over "
            f"{sorted(map(str, devices))}. Load it with from_pretrained(..., device_map=..., "
            "quantization_config=BitsAndBytesConfig(...)) and set quantization=None instead."
        )
    return devices.pop()


def _check_weights(modules: dict[str, nn.Module], option: str) -> None:
    for name, module in modules.items():
        dtype = module.weight.dtype
        if str(dtype).removeprefix("torch.") not in COMPUTE_DTYPES:
            raise ValueError(
                f"LadderConfig({option}): bitsandbytes quantizes {COMPUTE_DTYPES} weights, but "
                f"{name}.weight is {dtype}. Cast the model first, e.g. model.to(torch.float32)."
            )


def _float_dtype_name(model: nn.Module) -> str:
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return str(dtype).removeprefix("torch.")


__all__ = [
    "INSTALL_HINT",
    "LadderQuantizationWarning",
    "as_bitsandbytes_config",
    "describe",
    "is_bitsandbytes_available",
    "prepare_backbone",
    "quantize_in_place",
    "require_bitsandbytes",
]
