"""`push_to_hub` that keeps PEFT's model card for Ladder adapters.

`PeftModel.push_to_hub` is transformers' generic `PushToHubMixin.push_to_hub`: it lets PEFT write its model card
(`library_name: peft`, tags, base model) and then overwrites it with a plain transformers card
(`library_name: transformers`). For a Ladder adapter we upload the card PEFT wrote, with the caller's tags added,
the base model in its metadata, and two sections at the top: how to load the adapter (`pip install peft-ladder`, then
plain PEFT, no import) and the adapter's `LadderConfig`. Other PEFT types keep PEFT's behaviour untouched.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile

from huggingface_hub import ModelCard
from peft import PeftModel
from transformers.utils import hub as transformers_hub

from ._registration import LadderPeftType

MODEL_TAGS = ("ladder", "peft-ladder")
AUTO_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification"}


def _is_ladder(model: PeftModel) -> bool:
    return any(config.peft_type == LadderPeftType.LADDER for config in model.peft_config.values())


def push_to_hub(
    self: PeftModel,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
    **save_kwargs,
):
    """Save the adapter (config, weights, PEFT's model card) to a temporary folder and upload exactly that."""
    api = transformers_hub.hf_api()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        self.save_pretrained(folder, max_shard_size=max_shard_size, **save_kwargs)
        card_path = os.path.join(folder, "README.md")
        card = ModelCard.load(card_path)
        card.data.tags = sorted(set(card.data.tags or []) | set(MODEL_TAGS) | set(tags or []))
        base_model = _base_model(self)
        if base_model:
            card.data.base_model = base_model
        card.text = ladder_card_sections(self, repo_id) + "\n" + card.text
        card.save(card_path)
        return self._upload_modified_files(
            folder,
            repo_id,
            files_timestamps={},
            commit_message=commit_message,
            token=token,
            create_pr=create_pr,
            revision=revision,
            commit_description=commit_description,
        )


def _base_model(model: PeftModel) -> str | None:
    names = {config.base_model_name_or_path for config in model.peft_config.values()} - {None}
    return sorted(names)[0] if len(names) == 1 else None


def _config_json(config) -> str:
    return json.dumps(
        config.to_dict(), indent=2, sort_keys=True, default=lambda o: sorted(o) if isinstance(o, set) else str(o)
    )


def ladder_card_sections(model: PeftModel, repo_id: str) -> str:
    """The model card's "How to load" and "Ladder configuration" sections (markdown) for `model`'s adapters."""
    base_model = _base_model(model) or "path/to/the/base/model"
    ladder = {name: c for name, c in model.peft_config.items() if c.peft_type == LadderPeftType.LADDER}
    task_type = next(iter(ladder.values())).task_type
    auto_class = AUTO_CLASSES.get(getattr(task_type, "value", task_type), "AutoModel")
    subfolder = "" if "default" in ladder else f", subfolder={json.dumps(next(iter(ladder)))}"
    lines = [
        "## How to load",
        "",
        f"A Ladder side-network adapter for `{base_model}`, trained with "
        "[peft-ladder](https://pypi.org/project/peft-ladder/) (Ladder / xLadder side networks, "
        "[arXiv 2512.14237](https://arxiv.org/abs/2512.14237)). Install the plugin once:",
        "",
        "```bash",
        "pip install peft-ladder",
        "```",
        "",
        "then load the adapter with PEFT as any other. No `import peft_ladder` is needed: the package registers the "
        "LADDER tuner type when `peft` is imported (with `PEFT_LADDER_NO_AUTOLOAD=1` set, `import peft_ladder` first).",
        "",
        "```python",
        "from peft import PeftModel",
        f"from transformers import {auto_class}",
        "",
        f"base = {auto_class}.from_pretrained({json.dumps(base_model)})",
        f"model = PeftModel.from_pretrained(base, {json.dumps(repo_id)}{subfolder})",
        "```",
        "",
        "## Ladder configuration",
        "",
        f"Base model: `{base_model}`.",
    ]
    for name, config in ladder.items():
        lines += ["", f"Adapter `{name}` (`adapter_config.json`):", "", "```json", _config_json(config), "```"]
    return "\n".join(lines) + "\n"


def install() -> None:
    """Route `PeftModel.push_to_hub` through `push_to_hub` above for Ladder adapters only (idempotent)."""
    original = PeftModel.push_to_hub
    if getattr(original, "_peft_ladder", False):
        return

    @functools.wraps(original)
    def dispatch(self, *args, **kwargs):
        return (push_to_hub if _is_ladder(self) else original)(self, *args, **kwargs)

    dispatch._peft_ladder = True
    PeftModel.push_to_hub = dispatch
