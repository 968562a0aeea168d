"""Side networks: the small, trainable bypass that learns from a frozen backbone's tapped states.

Three families (DESIGN.md section 1); the third, the pretrained tail, lives in
:mod:`mobiflower.platform.pretrained_tail`:

* ``ladder`` (Ladder Side-Tuning / QST): per tapped layer, a down-projection d -> d/r of the
  backbone state is fused into the running side state by a learned sigmoid gate, then a small
  transformer block at width d/r; at the top an up-projection is gated against the backbone's last
  state and fed to the head.
* ``adapter`` (cascaded parallel adapters on selected tokens): one bottleneck adapter per tapped
  layer, input ``(1-mu_i) A_i + mu_i h_{i-1}``, ``h_i = in + act(in W_down) W_up``. Fed only the
  tokens the loss needs, it is the cheapest on the wire.

Raw hidden states of LLMs have a few huge outlier channels, so each tapped state first passes a
learnable RMSNorm. Heads: a trainable sequence-classification head, or the backbone's frozen final
norm + LM head (the server holds only these, never the backbone). Frozen tensors are buffers that
are not saved with the side network: the device already has them, the server gets them once.

This module is shared by the server (training) and the device (local inference), so it holds no
optimizer or training code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

FAMILIES = ("ladder", "adapter", "tail")
HEADS = ("classification", "lm")


class SideNetworkError(ValueError):
    """A side network cannot be built, loaded or fed; the message says what to change."""


@dataclass
class SideNetworkConfig:
    """Everything needed to rebuild a side network; saved with its weights."""

    hidden_size: int
    layers: list[int]
    fingerprint: str
    family: str = "adapter"
    head: str = "classification"
    num_classes: int = 2
    reduction: int = 8
    dropout: float = 0.1
    attention_heads: int = 4
    feature_token: str = "last"  # which token a classifier reads: "last" real token, or "first" (encoders)
    norm_eps: float = 1e-5
    # How the training activations were encoded, so local inference can see what training saw.
    bits: int = 16
    group_size: int = 64
    rotation: str = "hadamard"
    token_policy: str = "last"
    extra: dict[str, Any] = field(default_factory=dict)
    # Other backbones of the same family that train this network (a heterogeneous fleet): their
    # fingerprint -> their tapped layers, slot by slot aligned with ``layers`` (evenly spaced over
    # each backbone's own depth). Each gets its own input norms and projections to the side width.
    backbones: dict[str, list[int]] = field(default_factory=dict)
    # The pretrained tail (family "tail"): LoRA on the backbone's blocks above the cut (``layers[0] + 1``),
    # and the backbone's transformers config, which the server rebuilds those blocks from.
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    backbone_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise SideNetworkError(f"unknown side-network family {self.family!r}: choose one of {FAMILIES}")
        if self.head not in HEADS:
            raise SideNetworkError(f"unknown head {self.head!r}: choose one of {HEADS}")
        if self.reduction < 1 or self.hidden_size % self.reduction:
            raise SideNetworkError(f"reduction r={self.reduction} must divide the hidden size {self.hidden_size}")
        if not self.layers:
            raise SideNetworkError("a side network needs at least one tapped layer")
        for fingerprint, layers in self.backbones.items():
            if (
                fingerprint == self.fingerprint
                or len(layers) != len(self.layers)
                or list(layers) != sorted(set(layers))
            ):
                raise SideNetworkError(
                    f"backbone {fingerprint} taps {layers}: each further backbone needs as many strictly increasing "
                    f"tapped layers as the side network has slots ({len(self.layers)}), and a fingerprint of its own"
                )
        if self.family == "tail" and not self.backbone_config:
            raise SideNetworkError(
                "a pretrained tail needs the backbone's config (backbone_config): build it with "
                "mobiflower.platform.pretrained_tail.load_tail_weights"
            )
        if self.head == "lm" and self.token_policy == "last":
            raise SideNetworkError("an LM head needs every token: use token_policy 'nonpad' or 'all'")

    @property
    def width(self) -> int:
        return self.hidden_size // self.reduction

    def layers_for(self, fingerprint: str) -> list[int]:
        """The tapped layers a device running ``fingerprint`` sends, slot by slot."""
        if fingerprint == self.fingerprint:
            return list(self.layers)
        if fingerprint in self.backbones:
            return list(self.backbones[fingerprint])
        raise SideNetworkError(
            f"this side network was trained for {self.fingerprint}"
            + (f" and {sorted(self.backbones)}" if self.backbones else "")
            + f", not for {fingerprint}: use a side network trained for this backbone"
        )

    def serves(self, fingerprint: str) -> bool:
        """Whether a device running ``fingerprint`` can feed (and use) this network."""
        return fingerprint == self.fingerprint or fingerprint in self.backbones

    def backbone_key(self, fingerprint: str) -> str:
        """Module key of a further backbone's own norms and projections ("" for the first backbone)."""
        if not fingerprint or fingerprint == self.fingerprint:
            return ""
        return f"b{sorted(self.backbones).index(fingerprint)}"

    def accepts_layers(self, layers: Sequence[int], fingerprint: str = "") -> bool:
        """Whether a frame tapping ``layers`` can train this network: all of its backbone's layers, or a
        prefix (the lowest k), which is what a device sends when it stops its forward early to save time."""
        own = self.layers_for(fingerprint or self.fingerprint) if self.serves(fingerprint or self.fingerprint) else []
        return 1 <= len(layers) <= len(own) and list(layers) == own[: len(layers)]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SideNetworkConfig":
        return cls(**json.loads(text))


@dataclass
class SideBatch:
    """Tapped states in the side network's layout: per layer [B, T, d], a mask, and the target."""

    states: list[torch.Tensor]
    mask: torch.Tensor  # [B, T] bool, True on real tokens
    feature_index: torch.Tensor  # [B] long: the token a classifier reads
    targets: torch.Tensor | None = None  # [B] class ids, or [B, T] next-token ids (-100 ignored)
    sample_ids: list[int] = field(default_factory=list)
    backbone: str = ""  # the fingerprint of the backbone the states come from ("" = the network's first)

    def to(self, device: torch.device | str) -> "SideBatch":
        return SideBatch(
            [s.to(device) for s in self.states],
            self.mask.to(device),
            self.feature_index.to(device),
            None if self.targets is None else self.targets.to(device),
            self.sample_ids,
            self.backbone,
        )

    def __len__(self) -> int:
        return self.mask.shape[0]


def pad_rows(rows: torch.Tensor, counts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [sum(counts), d], sample after sample, to [B, max(counts), d] plus the real-token mask."""
    batch, width = len(counts), max(counts)
    if all(c == width for c in counts):
        return rows.reshape(batch, width, rows.shape[-1]), torch.ones(batch, width, dtype=torch.bool)
    counts_t = torch.as_tensor(list(counts))
    mask = torch.arange(width)[None, :] < counts_t[:, None]
    out = rows.new_zeros(batch, width, rows.shape[-1])
    out[mask] = rows
    return out, mask


def make_side_batch(
    layer_rows: Sequence[torch.Tensor],
    token_counts: Sequence[int],
    seq_lengths: Sequence[int],
    token_policy: str,
    feature_token: str = "last",
    targets: torch.Tensor | None = None,
    sample_ids: Sequence[int] = (),
    per_token_targets: bool | None = None,
) -> SideBatch:
    """Build a :class:`SideBatch` from per-layer rows as a frame (or the device) lays them out.

    ``per_token_targets``: whether ``targets`` hold one value per sent row (next-token targets, laid
    out to ``[B, T]``) or one per sample (class ids); None guesses from their count, which cannot tell
    the two apart when every sample sends one row."""
    states, mask = [], None
    for rows in layer_rows:
        padded, mask = pad_rows(rows, token_counts)
        states.append(padded)
    assert mask is not None
    if token_policy == "all":  # every position was sent: padding is known from the real lengths
        mask = torch.arange(mask.shape[1])[None, :] < torch.as_tensor(list(seq_lengths))[:, None]
    if token_policy == "last" or feature_token == "first":
        feature = torch.zeros(len(token_counts), dtype=torch.long)
    else:
        feature = mask.sum(dim=1).long() - 1
    if per_token_targets is None:
        per_token_targets = targets is not None and len(targets) != len(token_counts)
    if targets is not None and targets.dim() == 1 and per_token_targets:
        targets, _ = pad_rows(targets[:, None], token_counts)
        targets = targets[..., 0].masked_fill(~mask, -100)
    return SideBatch(states, mask, feature, targets, list(sample_ids))


class FrozenNorm(nn.Module):
    """The backbone's final norm as a frozen buffer (RMSNorm, LayerNorm, or none)."""

    def __init__(self, state: dict[str, torch.Tensor], eps: float):
        super().__init__()
        self.eps = eps
        self.kind = "layer" if "final_norm.bias" in state else ("rms" if "final_norm.weight" in state else "none")
        if self.kind != "none":
            self.register_buffer("weight", state["final_norm.weight"].float().clone(), persistent=False)
        if self.kind == "layer":
            self.register_buffer("bias", state["final_norm.bias"].float().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rms":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        if self.kind == "layer":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return x


class ClassificationHead(nn.Module):
    """Reads one token per sample (``feature_index``) and predicts a class."""

    def __init__(self, hidden: int, num_classes: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor, batch: SideBatch) -> torch.Tensor:
        feature = x[torch.arange(x.shape[0], device=x.device), batch.feature_index]
        return self.out(self.dropout(self.norm(feature)))


class FrozenLMHead(nn.Module):
    """The backbone's frozen LM head (vocabulary logits for every position)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        if "lm_head.weight" not in state:
            raise SideNetworkError("an LM head needs the backbone's frozen 'lm_head.weight'")
        self.register_buffer("weight", state["lm_head.weight"].float().clone(), persistent=False)

    def forward(self, x: torch.Tensor, batch: SideBatch) -> torch.Tensor:
        return F.linear(x, self.weight)


class SideBlock(nn.Module):
    """A small pre-norm transformer block at the side width (attention is masked to real tokens)."""

    def __init__(self, width: int, heads: int, dropout: float, causal: bool):
        super().__init__()
        self.heads = heads if width % heads == 0 else 1
        self.causal = causal
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        if t > 1:
            q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
            allowed = mask[:, None, None, :]
            if self.causal:
                allowed = allowed & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            allowed = allowed | ~mask[:, None, :, None]  # padded queries attend anywhere: no NaN rows
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
            x = x + self.dropout(self.proj(att.transpose(1, 2).reshape(b, t, w)))
        else:  # one token attends only to itself: attention reduces to its value projection
            v = self.qkv(self.norm1(x))[..., 2 * w :]
            x = x + self.dropout(self.proj(v))
        return x + self.dropout(self.mlp(self.norm2(x)))


class SideNetwork(nn.Module):
    """Common base: input norms per tapped layer, the head, and the input checks."""

    def __init__(
        self,
        config: SideNetworkConfig,
        frozen: dict[str, torch.Tensor],
        frozen_by_backbone: dict[str, dict[str, torch.Tensor]] | None = None,
    ):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.input_norms = nn.ModuleList(nn.RMSNorm(d, eps=1e-6) for _ in config.layers)
        self.final_norm = FrozenNorm(frozen, config.norm_eps)
        # further backbones of a heterogeneous fleet: their own input norms and frozen final norm
        others = {config.backbone_key(fp): fp for fp in config.backbones}
        self.extra_norms = nn.ModuleDict(
            {k: nn.ModuleList(nn.RMSNorm(d, eps=1e-6) for _ in config.layers) for k in others}
        )
        self.extra_final_norms = nn.ModuleDict(
            {k: FrozenNorm((frozen_by_backbone or {}).get(fp, frozen), config.norm_eps) for k, fp in others.items()}
        )
        if config.head == "classification":
            self.head: nn.Module = ClassificationHead(d, config.num_classes, config.dropout)
        else:
            self.head = FrozenLMHead(frozen)

    def _norms(self, batch: SideBatch) -> tuple[nn.ModuleList, nn.Module]:
        """The input norms and frozen final norm of the backbone ``batch`` comes from."""
        key = self.config.backbone_key(batch.backbone)
        if not key:
            return self.input_norms, self.final_norm
        return self.extra_norms[key], self.extra_final_norms[key]

    def check(self, batch: SideBatch) -> None:
        """Batches carry every tapped layer, or a prefix of them: a slow device may tap only the lower
        layers (its forward stops early) and the network then reads what it got (``accepts_layers``)."""
        if not 1 <= len(batch.states) <= len(self.config.layers):
            raise SideNetworkError(
                f"the side network takes 1 to {len(self.config.layers)} tapped layers (a prefix "
                f"of {self.config.layers}), got {len(batch.states)}"
            )
        for state in batch.states:
            if state.shape[-1] != self.config.hidden_size:
                raise SideNetworkError(
                    f"tapped state width {state.shape[-1]} != side network's {self.config.hidden_size}"
                )

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class LadderSideNetwork(SideNetwork):
    def __init__(
        self,
        config: SideNetworkConfig,
        frozen: dict[str, torch.Tensor],
        frozen_by_backbone: dict[str, dict[str, torch.Tensor]] | None = None,
    ):
        super().__init__(config, frozen, frozen_by_backbone)
        d, w, n = config.hidden_size, config.width, len(config.layers)
        self.downs = nn.ModuleList(nn.Linear(d, w) for _ in range(n))
        # per-backbone projections to the side width; blocks, gates and head are shared
        self.extra_downs = nn.ModuleDict(
            {k: nn.ModuleList(nn.Linear(d, w) for _ in range(n)) for k in self.extra_norms}
        )
        self.gates = nn.Parameter(torch.zeros(n))  # sigmoid(0) = 0.5, the LST/QST init
        causal = config.head == "lm"
        self.blocks = nn.ModuleList(SideBlock(w, config.attention_heads, config.dropout, causal) for _ in range(n))
        self.up = nn.Linear(w, d)
        self.top_gate = nn.Parameter(torch.zeros(()))

    def forward(self, batch: SideBatch) -> torch.Tensor:
        self.check(batch)
        norms, final_norm = self._norms(batch)
        key = self.config.backbone_key(batch.backbone)
        downs = self.extra_downs[key] if key else self.downs
        side = None
        for i, state in enumerate(batch.states):
            z = downs[i](norms[i](state))
            if side is not None:
                g = torch.sigmoid(self.gates[i])
                z = g * z + (1 - g) * side
            side = self.blocks[i](z, batch.mask)
        g = torch.sigmoid(self.top_gate)
        out = g * self.up(side) + (1 - g) * final_norm(batch.states[-1])
        return self.head(out, batch)


class ParallelAdapterSideNetwork(SideNetwork):
    def __init__(
        self,
        config: SideNetworkConfig,
        frozen: dict[str, torch.Tensor],
        frozen_by_backbone: dict[str, dict[str, torch.Tensor]] | None = None,
    ):
        super().__init__(config, frozen, frozen_by_backbone)
        d, w, n = config.hidden_size, config.width, len(config.layers)
        self.downs = nn.ModuleList(nn.Linear(d, w) for _ in range(n))
        self.ups = nn.ModuleList(nn.Linear(w, d) for _ in range(n))
        for up in self.ups:  # each adapter starts as the identity
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.mus = nn.Parameter(torch.zeros(n))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, batch: SideBatch) -> torch.Tensor:
        self.check(batch)
        norms, _ = self._norms(batch)
        h = None
        for i, state in enumerate(batch.states):
            a = norms[i](state)
            if h is None:
                x = a
            else:
                mu = torch.sigmoid(self.mus[i])
                x = (1 - mu) * a + mu * h
            h = x + self.dropout(self.ups[i](F.gelu(self.downs[i](x))))
        return self.head(h, batch)


def update_digest(h, tensors: dict[str, torch.Tensor]) -> None:
    """Feed named tensors into a hashlib object in name order (what proves a state unchanged)."""
    for name, tensor in sorted(tensors.items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())


def side_network_loss(logits: torch.Tensor, batch: SideBatch) -> torch.Tensor:
    """The task's loss (:func:`mobiflower.platform.tasks.task_loss`) of a network's output on ``batch``."""
    if batch.targets is None:
        raise SideNetworkError("this batch has no targets: a frame for training needs labels")
    from mobiflower.platform.tasks import task_loss

    return task_loss(logits, batch.targets)


def save_side_network(net: SideNetwork, path: str | Path, extra: dict[str, str] | None = None) -> Path:
    """Write the trainable weights as safetensors, the config in its metadata (what a device downloads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(tmp), metadata={"mobiflower_side_network": net.config.to_json(), **(extra or {})})
    tmp.replace(path)
    return path


def read_side_network_config(path: str | Path) -> SideNetworkConfig:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise SideNetworkError(f"{path} is not a side-network file: {err}") from err
    if "mobiflower_side_network" not in meta:
        raise SideNetworkError(f"{path} has no side-network config: was it written by save_side_network?")
    return SideNetworkConfig.from_json(meta["mobiflower_side_network"])
