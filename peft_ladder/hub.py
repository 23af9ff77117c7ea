"""`push_to_hub` that keeps PEFT's model card for Ladder adapters.

`PeftModel.push_to_hub` is transformers' generic `PushToHubMixin.push_to_hub`: it lets PEFT write its model card
(`library_name: peft`, tags, base model) and then overwrites it with a plain transformers card
(`library_name: transformers`). For a Ladder adapter we upload the card PEFT wrote, with the caller's tags added.
Other PEFT types keep PEFT's behaviour untouched.
"""

from __future__ import annotations

import functools
import os
import tempfile

from huggingface_hub import ModelCard
from peft import PeftModel
from transformers.utils import hub as transformers_hub

from ._registration import LadderPeftType

MODEL_TAGS = ("ladder", "peft-ladder")


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
