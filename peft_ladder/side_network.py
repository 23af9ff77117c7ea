"""The Ladder side network: projection adapters, side blocks, gates and the up-projection.

Plain `nn.Module`s with no PEFT import. The side blocks are the backbone's own decoder-layer class built at width
d_s = d / r (see `backbone.side_config`), so attention, rotary and padding conventions are the backbone's.

```
 hidden[source] --down--> s_0 --[mix]--> block 0 --[mix]--> block 1 ... block l-1 --norm--> up --> x scale --> + h_L
                               ^                  ^
 hidden[i0 + 1] --down---------+   hidden[i1 + 1]-+          (i_j: the backbone layer connected to side block j)
```

Each `down` is a Linear(d, d_s), or with `LadderConfig.down_rank` k QST's low-rank d -> k -> d_s
(`down_projection`): k (d + d_s) weights per tap instead of d d_s, the lever at 70B (docs/benchmarks.md).

Why the side output is scaled by rms(h_L) (docs/defaults.md has the measurements): the fusion point is the input of the
backbone's final RMS norm, where a pretrained model's residual stream is large (per-token RMS about 42 in
SmolLM2-135M, with outliers in the thousands) and differs from model to model. An up-projection added there
unscaled moves the normalised state by (its step) / rms(h_L): with Adam, whose steps are about the learning rate per
weight whatever the gradient, such an adapter barely learns at usual rates (a tenth of LoRA's held-out gain in 20
steps). Expressed in units of the stream's own per-token RMS (detached: a constant for autograd, like the backbone),
the side output has the same effect on the final norm's input on every backbone. The up-projection still starts at
zero, so a fresh adapter is an exact identity.

Why it is also divided by the final norm's large gains (`fusion_scale="rms_gain"`, the default since format 2;
docs/defaults.md, "Backbones with outliers"): the final norm multiplies dimension k by its gain g_k (Gemma: 1 + w,
with w up to 300 in Gemma 3 270M), so a side output of u_k * rms(h_L) moves the head's input by about u_k * g_k. A
few dimensions with gains hundreds of times the typical one then take outsized first steps and raise the training
loss (tiny Llama and Gemma 3 models with such gains: +12-14% after one step at lr 1e-3). Scaling dimension k by
min(1, median|g| / |g_k|) gives no dimension more than a typical gain's effect; on a backbone without such gains
nearly nothing changes. Outliers in h_L itself (per-token RMS 1,236 for a median |value| of 221) did not raise the
loss in the same measurements.
"""

from __future__ import annotations

from typing import Callable, Literal, Optional, Union, get_args

import torch
from torch import nn

from .connections import ConnectionPlan
from .taps import SAVED_TAPS, SavedTaps, TapLinear, tap_reader
from .tokens import LadderTokenRows, TokenTargets

BlockRunner = Callable[[nn.Module, torch.Tensor], torch.Tensor]
RMS_EPS = 1e-6  # of the side norm and of rms(h_L), the unit the side output is added in
FusionScale = Literal["rms", "rms_gain"]  # LadderConfig.fusion_scale: what the side output is multiplied by
FUSION_SCALES: tuple[str, ...] = get_args(FusionScale)


def check_down_rank(down_rank: Optional[int], side_width: int, reduction_factor: int) -> None:
    """Raise a ValueError if `down_rank` (LadderConfig.down_rank) is not below the side width it projects to."""
    if down_rank is not None and down_rank >= side_width:
        raise ValueError(
            f"down_rank={down_rank} is not below the side width {side_width} (hidden size / reduction_factor="
            f"{reduction_factor}): a rank-{down_rank} down-projection would have at least the full one's rank and "
            f"more parameters. Use a down_rank below {side_width} (e.g. {min(16, max(1, side_width // 4))}) or None."
        )


def down_projection(hidden_size: int, side_width: int, down_rank: Optional[int]) -> nn.Module:
    """One tap's down-projection: Linear(d, d_s), or with `down_rank` k QST's low-rank d -> k -> d_s
    (Sequential(Linear(d, k, bias=False), Linear(k, d_s))): k * (d + d_s) weights instead of d * d_s."""
    if down_rank is None:
        return TapLinear(hidden_size, side_width)
    # The first Linear reads the tap: a TapLinear, so the tap is kept as `saved_taps` says (taps.py).
    return nn.Sequential(TapLinear(hidden_size, down_rank, bias=False), nn.Linear(down_rank, side_width))


class LadderSideNetwork(nn.Module):
    """One adapter's side network. `project` runs at each tapped layer, `forward` at the fusion point."""

    def __init__(
        self,
        plan: ConnectionPlan,
        hidden_size: int,
        side_config,
        block_cls: type,
        gate: Union[str, float] = "sum",
        gate_temperature: float = 0.1,
        init_weights: bool = True,
        fusion_scale: str = "rms_gain",
        tokens: Optional[TokenTargets] = None,
        down_rank: Optional[int] = None,
    ) -> None:
        super().__init__()
        side_width = int(side_config.hidden_size)
        self.plan = plan
        self.side_config = side_config  # its layer count sizes the generation cache (cache.py)
        self.gate_mode = gate
        self.gate_temperature = float(gate_temperature)
        self.fusion_scale = fusion_scale
        # Projection adapters, keyed by the hidden-state index they read (see `connections.py`).
        self.down = nn.ModuleDict(
            {str(index): down_projection(hidden_size, side_width, down_rank) for index in plan.tap_indices}
        )
        self.blocks = nn.ModuleList(
            [block_cls(side_config, layer_idx=plan.num_layers + j) for j in range(plan.side_blocks)]
        )
        self.norm = nn.RMSNorm(side_width, eps=RMS_EPS)
        self.up = nn.Linear(side_width, hidden_size, bias=False)
        if gate == "learned":
            # LST's gate: mu = sigmoid(a / T), a = 0 at init (an even mix); one per connection, all used every step.
            self.gate_logits = nn.Parameter(torch.zeros(len(plan.block_to_layer)))
        self._gate_slot = {block: slot for slot, block in enumerate(plan.block_to_layer)}
        if init_weights:
            nn.init.zeros_(self.up.weight)  # a fresh adapter reproduces the base model exactly
        else:
            # A clearly non-identity adapter (for tests): the side output is about sqrt(d_s) times rms(h_L).
            nn.init.normal_(self.up.weight, std=1.0)
        # LadderConfig.trainable_token_indices (tokens.py). Built last: adapters without it draw the same random init.
        self.tokens = LadderTokenRows(tokens, hidden_size, init_weights) if tokens is not None else None

    # LadderConfig.side_checkpointing, saved_taps and mlp_chunk_size (set by `set_memory_options`; their defaults).
    checkpointing: Optional[bool] = None
    saved_taps: SavedTaps = "native"
    mlp_chunk_size: Optional[int] = None

    def set_memory_options(
        self, checkpointing: Optional[bool], saved_taps: SavedTaps, mlp_chunk_size: Optional[int] = None
    ) -> None:
        """How training keeps what backward needs: `checkpointing` the side blocks, `saved_taps` the taps (taps.py);
        and `mlp_chunk_size`, the tokens per chunk the backbone's MLPs run over while this adapter is active."""
        assert saved_taps in SAVED_TAPS, saved_taps
        self.checkpointing, self.saved_taps, self.mlp_chunk_size = checkpointing, saved_taps, mlp_chunk_size
        for down in self.down.values():
            reader = tap_reader(down)
            assert reader is not None, "a down-projection must read its tap with a taps.TapLinear"
            reader.saved_taps = saved_taps

    def checkpoints_blocks(self) -> bool:
        """Whether this forward recomputes the side blocks in backward instead of keeping their activations: when
        training (train mode, grad enabled), and by default only with 2+ blocks (with one, the peak stays the same)."""
        if not (self.training and torch.is_grad_enabled()):
            return False
        return len(self.blocks) > 1 if self.checkpointing is None else self.checkpointing

    @property
    def dtype(self) -> torch.dtype:
        return self.up.weight.dtype

    def reads(self, index: int) -> bool:
        return str(index) in self.down

    def project(self, index: int, hidden: torch.Tensor, token_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Down-project backbone hidden state `hidden[index]`; detached, so no gradient reaches the backbone.

        The tap stays in the backbone's dtype: the `TapLinear` that reads it casts it on the fly and keeps it for its
        weight gradient as `saved_taps` says (taps.py). The state that seeds the side stream (s_0) first gets the
        token rows of `token_ids` (B, T), if any, in the side dtype.
        """
        hidden = hidden.detach().to(self.up.weight.device)
        if index == self.plan.source and self.tokens is not None:
            hidden = self.tokens.add_to_stream(hidden.to(self.dtype), token_ids)
        return self.down[str(index)](hidden)

    def output_scale(self, stream: torch.Tensor) -> torch.Tensor:
        """Per-token RMS of h_L (B, T, 1), detached: the unit the side output is added in (module docstring)."""
        return stream.detach().to(self.dtype).pow(2).mean(-1, keepdim=True).add(RMS_EPS).sqrt()

    def gain_factor(self, norm_gain: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """min(1, median|g| / |g_k|) (d,) for the final norm's gain g with `fusion_scale="rms_gain"`, else None."""
        if self.fusion_scale == "rms" or norm_gain is None:
            return None
        gain = norm_gain.detach().to(self.dtype).abs()
        typical = gain.median().clamp_min(torch.finfo(gain.dtype).tiny)  # all-zero gains: no division by zero
        return typical / gain.clamp_min(typical)

    def mix(self, block: int, side: torch.Tensor, tap: torch.Tensor) -> torch.Tensor:
        if self.gate_mode == "sum":
            return side + tap
        if self.gate_mode == "learned":
            mu = torch.sigmoid(self.gate_logits[self._gate_slot[block]] / self.gate_temperature)
        else:
            mu = float(self.gate_mode)
        return mu * side + (1.0 - mu) * tap

    def forward(
        self,
        taps: dict[int, torch.Tensor],
        run_block: BlockRunner,
        stream: torch.Tensor,
        norm_gain: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Run the side stream over the projected `taps`; return what is added to `stream` (h_L), (B, T, d).

        `norm_gain`: the final norm's per-dimension gain (d,), which `fusion_scale="rms_gain"` divides by.
        """
        side = taps[self.plan.source]  # s_0: (B, T, d_s)
        for j, block in enumerate(self.blocks):
            layer = self.plan.block_to_layer.get(j)
            if layer is not None:
                side = self.mix(j, side, taps[layer + 1])
            side = run_block(block, side)
        side_out = self.up(self.norm(side))  # (B, T, d)
        factor = self.gain_factor(norm_gain)
        if factor is not None:
            side_out = side_out * factor  # (d,): a constant, so autograd keeps d numbers, not a (B, T, d) scale
        return side_out * self.output_scale(stream)
