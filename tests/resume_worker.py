"""A tiny Ladder `Trainer` run that kills itself with a signal at a fixed point; started by test_resume.py.

    python tests/resume_worker.py --output-dir run --kill sigkill --at 4          # dies inside step 4's forward
    python tests/resume_worker.py --output-dir run --kill sigkill-in-save --at 4  # dies writing checkpoint-4
    python tests/resume_worker.py --output-dir run --resume last --out result.pt  # resume_from_checkpoint=True

The run is deterministic on CPU: one thread, fixed seeds, attention dropout 0.1 (so every step draws from the RNG
and a resume that did not restore the RNG state would differ), 16 rows in batches of 4 (4 steps an epoch),
a checkpoint every 2 steps, 6 steps, a warm-up and a linear decay (a scheduler whose state matters). A killed run
sends the signal to itself, so where it lands is not left to timing:

* `sigkill`, `sigterm`: in the middle of the forward pass of step `--at` (after the first decoder layer). Python
  has no SIGTERM handler by default, so SIGTERM ends the process as SIGKILL does.
* `sigterm-jit`: the same SIGTERM with `enable_jit_checkpoint=True`, transformers' graceful stop: it saves a
  checkpoint at the next callback point (its grace period set to 0 here) and ends the run, exit status 0.
* `sigkill-in-save`: while checkpoint-`--at` is written, right after `save_pretrained` wrote the adapter files and
  before `optimizer.pt`, `scheduler.pt`, `rng_state.pth` and `trainer_state.json`.

test_resume.py imports `run` to train the uninterrupted and the resumed runs in its own process.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
import warnings

import torch
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # conftest, tiny_training

ROWS, BATCH, STEPS, SAVE_STEPS = 16, 4, 6, 2
KILLS = ("none", "sigkill", "sigterm", "sigterm-jit", "sigkill-in-save")


def build_model():
    from conftest import ladder, tiny_causal_lm

    return ladder(tiny_causal_lm("llama", attention_dropout=0.1), seed=0, init_weights=False)


def build_trainer(model, output_dir: str, **overrides):
    from datasets import Dataset
    from tiny_training import counting_rows
    from transformers import Trainer, TrainingArguments

    args = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        learning_rate=1e-2,
        warmup_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    args.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**args), train_dataset=Dataset.from_list(counting_rows(ROWS)))


def kill_mid_forward(model, trainer, step: int, signum: int) -> None:
    """Send `signum` to this process inside the forward pass of optimizer step `step` (counted from 1)."""
    from peft_ladder.layer import LadderTapLayer

    first_layer = next(m for m in model.modules() if isinstance(m, LadderTapLayer))
    jit = next((c.jit_manager for c in trainer.callback_handler.callbacks if hasattr(c, "jit_manager")), None)
    if jit is not None:
        jit.kill_wait = 0  # the grace period transformers waits for a SIGKILL to follow (3 s)

    def hook(module, args, output):
        if trainer.state.global_step != step - 1:
            return
        os.kill(os.getpid(), signum)
        if jit is not None:  # wait for the timer thread to request the checkpoint, as a long step would
            deadline = time.monotonic() + 60
            while not jit.is_checkpoint_requested and time.monotonic() < deadline:
                time.sleep(0.01)

    first_layer.register_forward_hook(hook)


def kill_inside_checkpoint_write(model, step: int) -> None:
    """SIGKILL this process once checkpoint-`step`'s adapter files are written, before the rest of the checkpoint."""
    save_pretrained = model.save_pretrained

    def save_then_die(save_directory, *args, **kwargs):
        save_pretrained(save_directory, *args, **kwargs)
        if os.path.basename(os.path.normpath(save_directory)) == f"checkpoint-{step}":
            os.kill(os.getpid(), signal.SIGKILL)

    model.save_pretrained = save_then_die


class StepCounter(TrainerCallback):
    def __init__(self) -> None:
        self.count = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.count += 1


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-exact comparisons need the same reduction order in every run
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run(output_dir, kill: str = "none", at: int = 4, resume_from: str | bool | None = None) -> dict:
    """Train (or resume) the tiny run; returns what a resumed run must reproduce."""
    with one_thread():
        model = build_model()
        trainer = build_trainer(model, output_dir, enable_jit_checkpoint=kill == "sigterm-jit")
        if kill in ("sigkill", "sigterm", "sigterm-jit"):
            kill_mid_forward(model, trainer, at, signal.SIGKILL if kill == "sigkill" else signal.SIGTERM)
        elif kill == "sigkill-in-save":
            kill_inside_checkpoint_write(model, at)
        steps = StepCounter()
        trainer.add_callback(steps)
        trainer.train(resume_from_checkpoint=resume_from)
    return {
        "steps_run": steps.count,  # optimizer steps this process ran; a resume runs only those after its checkpoint
        "side": {n: p.detach().clone() for n, p in model.named_parameters() if ".ladder_" in n},
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.lr_scheduler.state_dict(),
        "losses": [log["loss"] for log in trainer.state.log_history if "loss" in log],
        "global_step": trainer.state.global_step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--kill", choices=KILLS, default="none")
    parser.add_argument("--at", type=int, default=4, help="the step in whose forward pass or checkpoint it dies")
    parser.add_argument("--resume", choices=("no", "last", "last-complete"), default="no")
    parser.add_argument("--out", help="where a run that finishes writes its result (torch.save)")
    options = parser.parse_args()

    resume_from = {"no": None, "last": True}.get(options.resume)
    if options.resume == "last-complete":
        from peft_ladder import last_complete_checkpoint

        resume_from = last_complete_checkpoint(options.output_dir)  # warns about each checkpoint it skips
    warnings.filterwarnings("ignore")  # transformers' deprecation notices
    result = run(options.output_dir, options.kill, options.at, resume_from)
    if options.out:
        torch.save(result, options.out)


if __name__ == "__main__":
    main()
