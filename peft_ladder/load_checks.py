"""A saved Ladder adapter loads completely, or fails before the base model is touched, with a message that says why.

PEFT's loading is lenient where a side network cannot be (peft 0.21.2):
* `PeftConfig.from_peft_type` drops `adapter_config.json` fields its config class does not know, with a warning; a
  Ladder field dropped that way changes what the adapter computes (`LadderConfig` refuses them, `unknown_fields`).
* `load_adapter` loads a state dict with missing keys (a warning) or unexpected keys (nothing at all), so a base model
  with fewer layers than the adapter's silently loads part of it (`check_saved_tensors`).
* `PeftModel.from_pretrained` wraps the base model before it reads the weights, so a damaged file would leave Ladder
  layers inside a model the caller still holds. `LadderConfig.from_pretrained`, which PEFT calls first, reads both
  files here (`read_config_json`, `saved_tensor_shapes`), and the tuner compares the weights' shapes with the side
  network it is about to build before it changes anything (`expected_tensor_shapes`).
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
from typing import Optional

import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
RESAVE = "Re-save the adapter (model.save_pretrained) or download it again."
Shapes = dict[str, tuple[int, ...]]  # checkpoint key (no adapter name) -> tensor shape
_SIDE_KEY = re.compile(r"^(?P<prefix>.*)\.ladder_side\.(?P<rest>.+)$")


class AdapterFileError(ValueError):
    """An adapter file that cannot be read: the message names the file and what to do."""


# --- the two files ------------------------------------------------------------------------------------------------


def read_config_json(path: str) -> dict:
    """The fields in `path` (an adapter_config.json), or an AdapterFileError naming the file and the fix."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except UnicodeDecodeError:
        raise AdapterFileError(f"{path} is not text (binary data where JSON was expected). {RESAVE}") from None
    if not text.strip():
        raise AdapterFileError(f"{path} is empty; it should hold the adapter's config as JSON. {RESAVE}")
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as error:
        raise AdapterFileError(
            f"{path} is not valid JSON ({error.msg}, line {error.lineno} column {error.colno}): the file is "
            f"truncated or damaged. {RESAVE}"
        ) from None
    if not isinstance(fields, dict):
        raise AdapterFileError(f"{path} holds a JSON {type(fields).__name__}, not an object of config fields. {RESAVE}")
    return fields


def saved_tensor_shapes(folder: str) -> Optional[Shapes]:
    """Key -> shape of the tensors in `folder`'s adapter_model.safetensors (None without one): its header only."""
    from safetensors import SafetensorError, safe_open

    path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="pt") as file:  # checks that the header's tensors cover the whole file
            return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterFileError(
            f"{path} cannot be read ({error}): the file is empty, truncated or damaged. {RESAVE} The base model was "
            "not changed."
        ) from None


def install() -> None:
    """Make PEFT's reader of adapter_config.json name the file it cannot parse (it runs before any Ladder code).

    `PeftModel.from_pretrained` and `load_adapter` read the file once to find the PEFT type, and a bare
    `JSONDecodeError: Expecting value: line 1 column 1 (char 0)` would name neither the file nor a fix. Only the
    failure changes (AdapterFileError, a ValueError like JSONDecodeError); a readable file is read by PEFT as before.
    """
    from peft.config import PeftConfigMixin

    original = PeftConfigMixin.__dict__["from_json_file"].__func__
    if getattr(original, "_names_the_file", False):
        return

    @functools.wraps(original)
    def from_json_file(cls, path_json_file: str, **kwargs):
        try:
            fields = original(cls, path_json_file, **kwargs)
        except (json.JSONDecodeError, UnicodeDecodeError):
            read_config_json(path_json_file)  # raises the AdapterFileError naming the file
            raise
        if not isinstance(fields, dict):
            read_config_json(path_json_file)
        return fields

    from_json_file._names_the_file = True
    PeftConfigMixin.from_json_file = classmethod(from_json_file)


# --- fields a newer peft-ladder wrote -----------------------------------------------------------------------------


def unknown_fields(known: set[str], kwargs: dict) -> Optional[str]:
    """None if every key of `kwargs` is a field; else what a TypeError says about the unknown ones.

    Never "got an unexpected keyword argument": PEFT catches that message and drops the fields with a warning.
    """
    unknown = sorted(set(kwargs) - known)
    if not unknown:
        return None
    if "peft_type" not in kwargs:  # written in code: a typo
        hints = [
            f"{name!r} (did you mean {close[0]!r}?)"
            if (close := difflib.get_close_matches(name, known, n=1))
            else repr(name)
            for name in unknown
        ]
        return f"LadderConfig has no field {', '.join(hints)}; see help(LadderConfig) for its fields."
    return _newer_writer_message(unknown, kwargs.get("peft_ladder_version"), kwargs.get("peft_version"))


def _newer_writer_message(unknown: list[str], ladder_version: object, peft_version: object) -> str:
    import peft

    from . import __version__

    writer = f"peft-ladder {ladder_version}" if ladder_version else "a peft-ladder that did not record its version"
    if peft_version:
        writer += f" with peft {peft_version}"
    upgrade = [f"'peft-ladder>={ladder_version}'" if _newer(ladder_version, __version__) else "peft-ladder"]
    if _newer(peft_version, peft.__version__):
        upgrade.append(f"'peft>={str(peft_version).split('@')[0]}'")
    return (
        f"This Ladder adapter's config has fields that peft-ladder {__version__} (peft {peft.__version__}) does not "
        f"know: {unknown}. It was written by {writer}. Ignoring a field could change what the adapter computes, so "
        f"it is not loaded. Upgrade to read it: pip install -U {' '.join(upgrade)}."
    )


def _newer(version: object, than: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return bool(version) and Version(str(version).split("@")[0]) > Version(than)
    except InvalidVersion:
        return False


# --- the weights against the base model ----------------------------------------------------------------------------


def expected_tensor_shapes(side_network_factory, norm_name: str) -> Shapes:
    """The checkpoint keys and shapes of the side network `side_network_factory()` builds, built on `meta` (free)."""
    with torch.device("meta"):
        side = side_network_factory()
    return {f"base_model.model.{norm_name}.ladder_side.{key}": tuple(t.shape) for key, t in side.state_dict().items()}


def check_saved_tensors(saved: Shapes, expected: Shapes, where: str, model_layers: int, config, outcome: str) -> None:
    """Raise a ValueError naming what differs if the saved `ladder_` tensors are not exactly the expected ones.

    `outcome`: what the caller has left as it was, which the message states ("The base model is unchanged.").
    """
    saved = {key: shape for key, shape in saved.items() if ".ladder_" in key}
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    reshaped = sorted(key for key in set(saved) & set(expected) if saved[key] != expected[key])
    if not (missing or unexpected or reshaped):
        return
    lines = [f"The Ladder adapter in {where} does not fit this base model. {outcome}"]
    lines += _what_differs(saved, expected, model_layers, config)
    details = [
        ("missing from the file", missing, lambda key: _short(key)),
        ("in the file but not in this model", unexpected, lambda key: _short(key)),
        ("with other shapes", reshaped, lambda key: f"{_short(key)} (file {saved[key]}, model {expected[key]})"),
    ]
    for label, keys, show in details:
        if keys:
            shown = ", ".join(show(key) for key in keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
            lines.append(f"Tensors {label}: {shown}.")
    base = getattr(config, "base_model_name_or_path", None)
    lines.append(
        "Load it on the base model it was trained on"
        + (f" ({base!r}, adapter_config.json's base_model_name_or_path)." if base else ".")
    )
    raise ValueError(" ".join(lines))


def _short(key: str) -> str:
    match = _SIDE_KEY.match(key)
    return f"ladder_side.{match['rest']}" if match else key


def _what_differs(saved: Shapes, expected: Shapes, model_layers: int, config) -> list[str]:
    """Hidden size, layers and architecture of the base the file was saved for, against this one's."""
    found = []
    file_up, model_up = _up_shape(saved), _up_shape(expected)
    if file_up and model_up and file_up != model_up:
        found.append(
            f"It was saved for a backbone of hidden size {file_up[0]} (side width {file_up[1]}); this model has hidden "
            f"size {model_up[0]} (side width {model_up[1]})."
        )
    file_rank, model_rank = _down_rank(saved), _down_rank(expected)
    if file_rank != model_rank and _indices(saved, "down"):
        found.append(
            f"It was saved with {_rank_text(file_rank)}; this config builds {_rank_text(model_rank)} "
            "(adapter_config.json's down_rank must be the one it was trained with)."
        )
    file_layers, model_reads = _saved_layers(saved, config), _indices(expected, "down")
    if file_layers and f"{model_layers}" != file_layers and _indices(saved, "down") != model_reads:
        found.append(
            f"It was saved for a backbone of {file_layers} layers; this model has {model_layers} layers (the adapter "
            f"reads hidden states {_indices(saved, 'down')}, on this model it would read {model_reads})."
        )
    file_norms, model_norms = _prefixes(saved), _prefixes(expected)
    if file_norms and model_norms and file_norms != model_norms:
        found.append(
            f"It was saved for another architecture: its side network sits at {sorted(file_norms)}, this model's "
            f"final norm is {sorted(model_norms)}."
        )
    elif _block_parameters(saved) != _block_parameters(expected):
        differ = sorted(_block_parameters(saved) ^ _block_parameters(expected))
        found.append(
            "It was saved for another architecture: its side blocks (the backbone's decoder-layer class) have other "
            f"parameters than this model's ({', '.join(differ[:3])}{' ...' if len(differ) > 3 else ''})."
        )
    return found


def _down_rank(shapes: Shapes) -> Optional[int]:
    """LadderConfig.down_rank of the side network these tensors belong to: k from a low-rank down-projection's
    first weight (`down.<i>.0.weight`, (k, d)), None for full ones (`down.<i>.weight`)."""
    pattern = re.compile(r"\.ladder_side\.down\.\d+\.0\.weight$")
    return next((shape[0] for key, shape in shapes.items() if pattern.search(key)), None)


def _rank_text(rank: Optional[int]) -> str:
    return (
        "full down-projections (down_rank=None)" if rank is None else f"rank-{rank} down-projections (down_rank={rank})"
    )


def _block_parameters(shapes: Shapes) -> set[str]:
    """The parameter names of one side block (`self_attn.q_proj.weight`, ...), whichever block has them."""
    pattern = re.compile(r"\.ladder_side\.blocks\.\d+\.(.+)$")
    return {m[1] for key in shapes if (m := pattern.search(key))}


def _up_shape(shapes: Shapes) -> Optional[tuple[int, ...]]:
    return next((shape for key, shape in shapes.items() if key.endswith("ladder_side.up.weight")), None)


def _indices(shapes: Shapes, part: str) -> list[int]:
    pattern = re.compile(rf"\.ladder_side\.{part}\.(\d+)\.")
    return sorted({int(m[1]) for key in shapes if (m := pattern.search(key))})


def _prefixes(shapes: Shapes) -> set[str]:
    return {m["prefix"].removeprefix("base_model.model.") for key in shapes if (m := _SIDE_KEY.match(key))}


def _saved_layers(saved: Shapes, config) -> Optional[str]:
    """How many layers the saved side network implies its backbone had: "4", "at least 3", or None."""
    reads, blocks = _indices(saved, "down"), len(_indices(saved, "blocks"))
    if not reads:
        return None
    if isinstance(config.connections, str) and config.side_layers is None:
        return str(blocks)  # the presets default to one side block per backbone layer
    if config.connections == "xladder":
        return str(reads[-1])  # xLadder reads the last layers' outputs, up to hidden[num_layers]
    return f"at least {reads[-1] if reads[-1] > 0 else 1}"
