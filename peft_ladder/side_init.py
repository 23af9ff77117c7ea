"""Side blocks initialised by structured pruning of the backbone (LadderConfig.side_init), as Ladder Side-Tuning does.

LST (Sung et al., 2022; `ylsung/Ladder-Side-Tuning`, `seq2seq/pruning/`) copies into each side block its backbone block
pruned to the side width. Three structures are pruned, ranked by an importance tensor per weight (the weight itself
for `magnitude`, the summed squared gradients over a few batches for `fisher`, LST's `compute_fisher`):

* residual dims: one index set of d_s dims for the whole side stream (every block reads and writes the same stream),
  ranked by the L1 norm of the input embedding's columns (LST prunes from `model.shared` first);
* attention heads: the top H_s heads (the backbone's head size is kept), ranked by the L1 norm of the product
  q * k * v * o^T restricted to the kept dims (LST's `pruning_bottleneck`); with grouped-query attention each kept
  query head takes the key/value head of its group, since side blocks have one key/value head per query head;
* MLP neurons: the top I_s, ranked by the L1 norm of gate * up * down^T (or fc1 * fc2^T).

```
 backbone layer i:  W (out x in)  --rows: kept heads / neurons, cols: kept dims-->  side block j:  W[rows][:, cols]
```

Side block j copies the backbone layer it is connected to; an unconnected block (xLadder's extra depth) copies the
layer after the previous block's, clipped to the last layer. The down-projections become selections of the kept dims
(down(h) = h[kept]), so the pruned blocks read the features they were pruned for; the up-projection stays zero, so a
fresh adapter is still an exact identity.
"""

from __future__ import annotations

from typing import Iterable, Literal, Optional, get_args

import torch
from torch import nn

from .backbone import Backbone, base_module, find_backbone
from .connections import ConnectionPlan

SideInit = Literal["default", "magnitude", "fisher"]  # LadderConfig.side_init
SIDE_INITS: tuple[str, ...] = get_args(SideInit)
Importance = dict[str, torch.Tensor]  # "embed" or "<layer>.<param name>" -> importance, shaped like the weight
_LINEAR_ROLES = {  # nn.Linear weight (out, in)
    "q_proj": ("q", "resid"),
    "k_proj": ("kv", "resid"),
    "v_proj": ("kv", "resid"),
    "o_proj": ("resid", "q"),
    "out_proj": ("resid", "q"),
    "gate_proj": ("mlp", "resid"),
    "up_proj": ("mlp", "resid"),
    "fc1": ("mlp", "resid"),
    "down_proj": ("resid", "mlp"),
    "fc2": ("resid", "mlp"),
}
_CONV1D_ROLES = {  # GPT-2's Conv1D weight (in, out)
    "attn.c_attn": ("resid", "qkv"),
    "attn.c_proj": ("q", "resid"),
    "mlp.c_fc": ("resid", "mlp"),
    "mlp.c_proj": ("mlp", "resid"),
}


def fisher_pending_message(adapter: str = "default") -> str:
    return (
        f"LadderConfig(side_init='fisher') but the side network of adapter {adapter!r} was not initialised: call "
        "peft_ladder.initialize_side_fisher(model, batches) after get_peft_model and before training (a few batches "
        "of input_ids, with labels or not), or use side_init='magnitude' (no data) or 'default'."
    )


# --- which backbone layer each side block copies ----------------------------------------------------------------------


def block_layers(plan: ConnectionPlan) -> list[int]:
    """Backbone layer copied by each side block: its connected layer, else the previous block's layer + 1, clipped."""
    layers, previous = [], plan.source - 1
    for j in range(plan.side_blocks):
        previous = plan.block_to_layer.get(j, min(previous + 1, plan.num_layers - 1))
        layers.append(previous)
    return layers


# --- importance ----------------------------------------------------------------------------------------------------


def _matrices(params: dict[str, torch.Tensor], hidden: int) -> dict[str, list[torch.Tensor]]:
    """A layer's attention and MLP matrices in (out, in) form, whatever the architecture names or lays them out."""
    found: dict[str, list[torch.Tensor]] = {"q": [], "k": [], "v": [], "o": [], "mlp_in": [], "mlp_out": []}
    role_of = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "out_proj": "o", "gate_proj": "mlp_in"}
    role_of.update({"up_proj": "mlp_in", "fc1": "mlp_in", "down_proj": "mlp_out", "fc2": "mlp_out"})
    for name, tensor in params.items():
        module, _, kind = name.rpartition(".")
        if kind != "weight":
            continue
        leaf = module.rpartition(".")[2]
        tail = ".".join(module.split(".")[-2:])
        if leaf in role_of:
            found[role_of[leaf]].append(tensor.float())
        elif tail == "attn.c_attn":
            q, k, v = tensor.float().t().split(hidden)
            found["q"].append(q), found["k"].append(k), found["v"].append(v)
        elif tail in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            found[{"attn.c_proj": "o", "mlp.c_fc": "mlp_in", "mlp.c_proj": "mlp_out"}[tail]].append(tensor.float().t())
    missing = [role for role, tensors in found.items() if len(tensors) == 0]
    if missing:
        raise ValueError(
            f"side_init: could not find the {missing} projections in the decoder layer (parameters: {sorted(params)}); "
            "pruned side init supports Llama-, OPT- and GPT-2-style layers; use side_init='default'."
        )
    return found


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in their original order (the pruned block keeps the backbone's layout)."""
    return scores.topk(k).indices.sort().values


def _product(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    out = None
    for tensor in tensors:
        out = tensor.double() if out is None else out * tensor.double()  # float64: Fisher products reach 1e-40
    return out.abs()


def kept_heads(mats, resid: torch.Tensor, heads: int, kv_heads: int, head_dim: int, side_heads: int) -> torch.Tensor:
    group = heads // kv_heads

    def per_head(w: torch.Tensor, n: int) -> torch.Tensor:  # (n * head_dim, d) -> (heads, head_dim, d_s)
        return w[:, resid].reshape(n, head_dim, -1).repeat_interleave(heads // n, dim=0)

    q, k, v = (per_head(mats[r][0], n) for r, n in (("q", heads), ("k", kv_heads), ("v", kv_heads)))
    o = per_head(mats["o"][0].t(), heads)
    assert group * kv_heads == heads
    return _top(_product((q, k, v, o)).sum(dim=(1, 2)), side_heads)


def kept_neurons(mats, resid: torch.Tensor, side_width: int) -> torch.Tensor:
    parts = [w[:, resid] for w in mats["mlp_in"]] + [mats["mlp_out"][0].t()[:, resid]]
    return _top(_product(parts).sum(dim=1), side_width)


# --- copying -----------------------------------------------------------------------------------------------------


def _roles(name: str) -> Optional[tuple[str, ...]]:
    module, _, kind = name.rpartition(".")
    leaf, tail = module.rpartition(".")[2], ".".join(module.split(".")[-2:])
    if leaf in _LINEAR_ROLES:
        roles = _LINEAR_ROLES[leaf]
        return roles if kind == "weight" else roles[:1]
    if tail in _CONV1D_ROLES:
        roles = _CONV1D_ROLES[tail]
        return roles if kind == "weight" else roles[1:]
    return None


def copy_pruned(block: nn.Module, layer: nn.Module, index: dict[str, torch.Tensor], hidden: int) -> None:
    """Copy `layer`'s weights into `block`, each dim sliced by the index set of its role (resid, q, kv, qkv, mlp)."""
    source = dict(layer.named_parameters())
    with torch.no_grad():
        for name, param in block.named_parameters():
            weight = source[name]
            roles = _roles(name)
            if roles is None:  # norms: residual-width ones are sliced, per-head ones (q_norm, k_norm) copied whole
                roles = ("resid",) if weight.shape[0] == hidden and weight.dim() == 1 else ()
            for dim, role in enumerate(roles):
                weight = weight.index_select(dim, index[role].to(weight.device))
            if weight.shape != param.shape:
                raise ValueError(
                    f"side_init: the pruned backbone parameter {name} has shape {tuple(weight.shape)} but the side "
                    f"block's has {tuple(param.shape)}; use side_init='default' for this architecture."
                )
            param.copy_(weight)


def _index_sets(mats, resid, backbone: Backbone, side_config) -> dict[str, torch.Tensor]:
    config = backbone.config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = mats["q"][0].shape[0] // heads
    side_heads = int(side_config.num_attention_heads)
    kept = kept_heads(mats, resid, heads, kv_heads, head_dim, side_heads)
    offsets = torch.arange(head_dim)
    q = (kept[:, None] * head_dim + offsets).flatten()
    kv = ((kept // (heads // kv_heads))[:, None] * head_dim + offsets).flatten()
    mlp = kept_neurons(mats, resid, _mlp_width(side_config))
    hidden = backbone.hidden_size
    return {"resid": resid, "q": q, "kv": kv, "qkv": torch.cat([q, q + hidden, q + 2 * hidden]), "mlp": mlp}


def _mlp_width(side_config) -> int:
    for name in ("intermediate_size", "ffn_dim", "n_inner"):
        if getattr(side_config, name, None):
            return int(getattr(side_config, name))
    return 4 * int(side_config.hidden_size)


def check_supported(backbone: Backbone, side_config, method: str, quantized: bool) -> None:
    """Raise a ValueError, before the model is changed, if pruned init cannot build this side network."""
    if method == "default":
        return
    if quantized:
        raise ValueError(
            f"side_init={method!r} prunes the backbone's float weights, but this backbone is quantized (bitsandbytes); "
            "use side_init='default' with a quantized backbone, or create the adapter on the float model."
        )
    config = backbone.config
    head_dim = int(getattr(config, "head_dim", None) or backbone.hidden_size // int(config.num_attention_heads))
    side_head_dim = int(getattr(side_config, "head_dim", None) or 0) or (
        int(side_config.hidden_size) // int(side_config.num_attention_heads)
    )
    if side_head_dim != head_dim:
        raise ValueError(
            f"side_init={method!r} keeps whole attention heads of size {head_dim}, but the side width "
            f"{side_config.hidden_size} gives side heads of size {side_head_dim}; choose a reduction_factor that "
            f"makes the side width a multiple of {head_dim}, or use side_init='default'."
        )


# --- entry points ---------------------------------------------------------------------------------------------------


def apply_pruned_init(side: nn.Module, model: nn.Module, importance: Optional[Importance] = None) -> None:
    """Initialise `side` (a LadderSideNetwork on `model`) from its backbone; `importance` None means magnitude."""
    backbone = find_backbone(model)
    layers = [base_module(model.get_submodule(name)) for name in backbone.layer_names]
    if importance is None:  # magnitude: the weights are their own importance
        importance = {"embed": model.get_input_embeddings().weight.detach()}
        for i, layer in enumerate(layers):
            importance.update({f"{i}.{n}": p.detach() for n, p in layer.named_parameters()})
    side_width = int(side.side_config.hidden_size)
    resid = _top(importance["embed"].float().abs().sum(dim=0), side_width)
    for block, i in zip(side.blocks, block_layers(side.plan), strict=True):
        params = {n.partition(".")[2]: t for n, t in importance.items() if n.partition(".")[0] == str(i)}
        index = _index_sets(_matrices(params, backbone.hidden_size), resid, backbone, side.side_config)
        copy_pruned(block, layers[i], index, backbone.hidden_size)
    with torch.no_grad():
        for down in side.down.values():  # a selection of the kept dims: the pruned blocks read their own features
            down.weight.zero_()
            down.weight[torch.arange(side_width), resid.to(down.weight.device)] = 1.0
            down.bias.zero_()


def prepare_side_init(side: nn.Module, model: nn.Module, method: str, adapter: str) -> None:
    """Called once per new side network: prune now (magnitude), or mark it as waiting for data (fisher)."""
    if method == "default" or side.up.weight.is_meta:  # meta: weights come from a state dict (low_cpu_mem_usage)
        return
    if method == "magnitude":
        apply_pruned_init(side, model)
        return

    def refuse_training(module: nn.Module, args) -> None:
        if module.training and torch.is_grad_enabled():
            raise RuntimeError(fisher_pending_message(adapter))

    def loaded(module: nn.Module, state_dict, prefix: str, *args) -> None:
        if any(key.startswith(prefix + "blocks.") for key in state_dict):  # a saved adapter's weights: initialised
            _mark_initialised(module)

    side._fisher_pending = (
        side.register_forward_pre_hook(refuse_training),
        side.register_load_state_dict_pre_hook(loaded),
    )


def _mark_initialised(side: nn.Module) -> None:
    for handle in getattr(side, "_fisher_pending", ()):
        handle.remove()
    side._fisher_pending = ()


def initialize_side_fisher(model: nn.Module, batches: Iterable[dict], adapter_name: Optional[str] = None) -> None:
    """Initialise a `side_init="fisher"` adapter from Fisher importance (summed squared gradients) over `batches`.

    Like PEFT's `initialize_lora_eva_weights(model, dataloader)`, call it after `get_peft_model` and before training.
    Each batch is a dict of model inputs; without `labels`, `input_ids` are used (the language-modelling loss).
    Backpropagates through the backbone with the adapter disabled; no optimizer; the backbone's `requires_grad` and
    `.grad` are restored exactly.

    Example:

    ```py
    >>> model = get_peft_model(base, LadderConfig(task_type="CAUSAL_LM", side_init="fisher"))  # doctest: +SKIP
    >>> initialize_side_fisher(model, [tokenizer(texts, return_tensors="pt", padding=True)])  # doctest: +SKIP
    ```
    """
    adapter = adapter_name or model.active_adapter
    config = model.peft_config[adapter]
    if getattr(config, "side_init", None) != "fisher":
        raise ValueError(
            f"initialize_side_fisher: adapter {adapter!r} has side_init={getattr(config, 'side_init', None)!r}; it "
            "only applies to LadderConfig(side_init='fisher')."
        )
    base = model.get_base_model()
    side = next(
        m.ladder_side[adapter] for m in base.modules() if hasattr(m, "ladder_side") and adapter in m.ladder_side
    )
    importance = _fisher(model, base, batches)
    apply_pruned_init(side, base, importance)
    _mark_initialised(side)


def _fisher(model: nn.Module, base: nn.Module, batches: Iterable[dict]) -> Importance:
    backbone = find_backbone(base)
    params = {"embed": base.get_input_embeddings().weight}
    for i, name in enumerate(backbone.layer_names):
        params.update({f"{i}.{n}": p for n, p in base_module(base.get_submodule(name)).named_parameters()})
    saved = {key: (p.requires_grad, p.grad) for key, p in params.items()}
    fisher = {key: torch.zeros_like(p, dtype=torch.float32) for key, p in params.items()}
    count = 0
    try:
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        with model.disable_adapter(), torch.enable_grad():
            for batch in batches:
                labels = batch.get("labels", batch["input_ids"])
                base(**{**batch, "labels": labels}).loss.backward()
                for key, p in params.items():
                    if p.grad is not None:
                        fisher[key] += p.grad.float().square()
                    p.grad = None
                count += 1
    finally:
        for key, p in params.items():
            p.requires_grad_(saved[key][0])
            p.grad = saved[key][1]
    if count == 0:
        raise ValueError("initialize_side_fisher: `batches` was empty; pass a few batches of model inputs.")
    return fisher
