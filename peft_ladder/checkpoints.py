"""Resuming a `Trainer` run that was killed: pick the newest checkpoint that was written to the end.

transformers' `Trainer._save_checkpoint` writes straight into `output_dir/checkpoint-N` (no temporary directory, no
rename): the adapter files first, then `optimizer.pt`, `scheduler.pt`, `rng_state.pth`, and `trainer_state.json`
last. A run killed in between leaves a `checkpoint-N` without `trainer_state.json`. `get_last_checkpoint`, which
`trainer.train(resume_from_checkpoint=True)` uses, picks the highest-numbered `checkpoint-N` directory whatever it
holds, so every later resume loads that checkpoint's adapter and then fails with `FileNotFoundError` on its
`trainer_state.json`, until someone deletes the directory by hand.
"""

from __future__ import annotations

import json
import os
import re
import warnings

TRAINER_STATE = "trainer_state.json"  # what Trainer writes last into a checkpoint
# transformers' just-in-time (SIGTERM) checkpoint writes this marker first and removes it when the save is done.
INCOMPLETE_MARKER = "checkpoint-is-incomplete.txt"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class IncompleteCheckpointWarning(UserWarning):
    """A checkpoint directory was skipped because its save did not finish."""


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` in `output_dir` whose save finished, or None when there is none.

    A drop-in for `transformers.trainer_utils.get_last_checkpoint` that skips, with an `IncompleteCheckpointWarning`
    naming each, the checkpoints a killed run left half-written: no readable `trainer_state.json`, or transformers'
    just-in-time checkpoint marker still present. Pass the result to `trainer.train(resume_from_checkpoint=...)`;
    None starts the run from the beginning, as a first run in an empty `output_dir` should.

    Example:
        >>> from peft_ladder import last_complete_checkpoint
        >>> last_complete_checkpoint("a-directory-with-no-checkpoints") is None
        True
    """
    if not os.path.isdir(output_dir):
        return None
    steps = {}
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            steps[int(match.group(1))] = os.path.join(output_dir, name)
    for step in sorted(steps, reverse=True):
        reason = _incomplete_reason(steps[step])
        if reason is None:
            return steps[step]
        warnings.warn(
            f"Skipping {steps[step]}: {reason}, so the run was stopped while saving it. Resuming from the newest "
            "complete checkpoint before it; the resumed run writes this step's checkpoint again.",
            IncompleteCheckpointWarning,
            stacklevel=2,
        )
    return None


def _incomplete_reason(checkpoint: str) -> str | None:
    if os.path.exists(os.path.join(checkpoint, INCOMPLETE_MARKER)):
        return f"transformers' marker {INCOMPLETE_MARKER} is still there"
    state = os.path.join(checkpoint, TRAINER_STATE)
    if not os.path.isfile(state):
        return f"it has no {TRAINER_STATE}, which Trainer writes last"
    try:
        with open(state, encoding="utf-8") as file:
            json.load(file)
    except (OSError, ValueError) as error:
        return f"its {TRAINER_STATE} does not parse ({type(error).__name__}: {error})"
    return None
