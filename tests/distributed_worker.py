"""One worker of a data-parallel Ladder run, started by tests/test_distributed.py (or by hand, see below).

    torchrun --nproc_per_node 2 tests/distributed_worker.py --engine trainer --out result.pt
    accelerate launch --multi_gpu --num_processes 2 tests/distributed_worker.py --engine trainer --out result.pt
    torchrun --nproc_per_node 2 tests/distributed_worker.py --engine fsdp2 --out result.pt
    python tests/distributed_worker.py --engine trainer --out result.pt        # one process, same global batch

Every engine trains the same tiny Ladder model on the same rows with the same *global* batch; each rank gets
`global_batch / world_size` rows per step. After every optimizer step the ranks all-gather their side weights and
record whether they are identical. Rank 0 writes the per-step record and the final side weights to `--out`.

Engines: `trainer` is transformers' `Trainer` with gradient checkpointing (DDP under torchrun or accelerate, gloo on
CPU; `use_cpu=True` is what makes it distributed there, without it each rank trains alone); `fsdp2` is a plain
loop over PyTorch's `fully_shard` (FSDP2): every frozen decoder layer, every down-projection and every side block its
own unit, the rest (embeddings, head, the side network's up-projection) in the root unit.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # conftest, tiny_training

GLOBAL_BATCH = 8
STEPS = 3
ROWS = 32


def build_model():
    from conftest import tiny_causal_lm
    from peft import get_peft_model

    from peft_ladder import LadderConfig

    model = tiny_causal_lm("llama")
    torch.manual_seed(0)
    return get_peft_model(model, LadderConfig(task_type="CAUSAL_LM", reduction_factor=4, init_weights=False))


def rows():
    from tiny_training import counting_rows

    return counting_rows(ROWS, masked_prefix=True)  # rows with different loss-token counts: means must be global


def flat_side(model) -> torch.Tensor:
    params = []
    for name, param in model.named_parameters():
        if ".ladder_" in name:
            tensor = param.full_tensor() if hasattr(param, "full_tensor") else param  # FSDP2 DTensor
            params.append(tensor.detach().float().flatten())
    return torch.cat(params)


def side_state(model) -> dict[str, torch.Tensor]:
    state = {}
    for name, param in model.named_parameters():
        if ".ladder_" in name:
            tensor = param.full_tensor() if hasattr(param, "full_tensor") else param
            state[name.replace("module.", "")] = tensor.detach().float().clone()
    return state


def ranks_identical(vector: torch.Tensor) -> float:
    """Largest difference between this rank's vector and any other rank's (0.0 in a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0.0
    gathered = [torch.empty_like(vector) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, vector)
    return max(float((other - vector).abs().max()) for other in gathered)


def run_trainer(output_dir: str) -> dict:
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    world = int(os.environ.get("WORLD_SIZE", "1"))
    record = {"rank_diffs": [], "losses": []}

    class RankCheck(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            record["rank_diffs"].append(ranks_identical(flat_side(model)))

    model = build_model()
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        max_steps=STEPS,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        use_cpu=True,
        ddp_backend="gloo" if world > 1 else None,
        activation_checkpointing=True,  # TRL's default; for Ladder it checkpoints the side blocks only
    )
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows()), callbacks=[RankCheck()])
    trainer.train()
    record["losses"] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    record["world_size"] = trainer.args.world_size
    record["distributed_type"] = str(trainer.accelerator.distributed_type)
    record["wrapped"] = type(trainer.model_wrapped).__name__
    record["side"] = side_state(trainer.model)
    return record


def run_fsdp2() -> dict:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from peft_ladder.layer import LadderFusionLayer, LadderTapLayer

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model().train()
    side = next(m for m in model.modules() if isinstance(m, LadderFusionLayer)).ladder_side["default"]
    for module in model.modules():
        if isinstance(module, LadderTapLayer):
            fully_shard(module.base_layer)  # a frozen decoder layer: its own unit, sharded between ranks
    # Side units must be modules whose own forward uses their weights: each down-projection (called at its tap) and
    # each side block. `fully_shard(side)` as one unit fails: the taps call `side.down[...]` before `side.forward`.
    for module in (*side.down.values(), *side.blocks):
        fully_shard(module)
    fully_shard(model)  # root unit: embeddings, norm, head, the side network's final norm and up-projection
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = rows()
    record = {"rank_diffs": [], "losses": [], "world_size": world, "distributed_type": "FSDP2", "wrapped": "FSDPModule"}
    per_rank = GLOBAL_BATCH // world
    for step in range(STEPS):
        global_rows = data[step * GLOBAL_BATCH : (step + 1) * GLOBAL_BATCH]
        local = global_rows[rank * per_rank : (rank + 1) * per_rank]
        inputs = {k: torch.tensor([r[k] for r in local]) for k in ("input_ids", "attention_mask", "labels")}
        tokens = sum(sum(1 for y in r["labels"][1:] if y != -100) for r in global_rows)
        # Sum over local tokens / global tokens, times world size: FSDP averages gradients over ranks.
        loss = model(**inputs, num_items_in_batch=torch.tensor(tokens)).loss * world
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        summed = loss.detach() / world
        dist.all_reduce(summed)
        record["losses"].append(float(summed))
        record["rank_diffs"].append(ranks_identical(flat_side(model)))
    record["side"] = side_state(model)
    record["backbone_local_fraction"] = _local_fraction(
        [p for m in model.modules() if isinstance(m, LadderTapLayer) for p in m.base_layer.parameters()]
    )
    record["side_blocks_local_fraction"] = _local_fraction([p for b in side.blocks for p in b.parameters()])
    return record


def _local_fraction(params) -> float:
    """Share of these (FSDP2-sharded) parameters' elements held by this rank."""
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
    return local / sum(p.numel() for p in params)


def run_single_loop() -> dict:
    """The FSDP2 loop's reference: one process, the whole global batch, AdamW at the same learning rate."""
    model = build_model().train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = rows()
    record = {"rank_diffs": [], "losses": [], "world_size": 1}
    for step in range(STEPS):
        batch_rows = data[step * GLOBAL_BATCH : (step + 1) * GLOBAL_BATCH]
        inputs = {k: torch.tensor([r[k] for r in batch_rows]) for k in ("input_ids", "attention_mask", "labels")}
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        record["losses"].append(float(loss.detach()))
        record["rank_diffs"].append(0.0)
    record["side"] = side_state(model)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("trainer", "fsdp2", "loop"), required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.engine == "trainer":
        record = run_trainer(os.path.join(os.path.dirname(args.out), "trainer_output"))
    elif args.engine == "fsdp2":
        record = run_fsdp2()
    else:
        record = run_single_loop()
    rank = int(os.environ.get("RANK", "0"))
    record["ranks_started"] = int(os.environ.get("WORLD_SIZE", "1"))
    if rank == 0:
        torch.save(record, args.out)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
