"""One configuration under one defense, measured: the frames a device sends, the attacks on them, the
accuracy the defense costs (what ``mobiflower bench privacy`` runs per row).

How frames are built: the device's forward runs once per sample set (``DeviceRuntime.make_frame`` at
16 bits: the float16 states of every real token at every layer any configuration taps); each
configuration's frame is then the one ``make_frame`` sends for it, derived from those states: the
rows its token policy selects, the defense (:mod:`mobiflower.platform.state_defense`) applied to them,
quantized by the codec at its bit-width and encoded. The only difference from a device that defends
inside its forward is that the defense sees the states rounded to float16 first (relative error about
1e-3, far below the noise and the codec's). The server's side decodes them exactly as the server
does (``decode_frame``, then the codec's ``dequantize``), and the side network trains with the
server's own trainer.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import numpy as np
import torch

from mobiflower.clients.runtime import (
    DeviceRuntime,
    ForwardConfig,
    row_positions,
    select_tokens,
    sent_counts,
    sent_mask,
)
from mobiflower.platform.backbone import Backbone, evenly_spaced_layers
from mobiflower.platform.codec import SUPPORTED_BITS, concatenate, default_group_size, dequantize, quantize
from mobiflower.platform.data import task_samples
from mobiflower.platform.frames import Frame, decode_frame, encode_frame
from mobiflower.platform.state_defense import StateDefense, privacy_loss
from mobiflower.platform.state_defense import apply as defend
from mobiflower.platform.tasks import ClassificationTask, Example
from mobiflower.simulations.bench import privacy_attacks as attacks

if TYPE_CHECKING:  # annotations only: the settings module imports this one to run the bench
    from mobiflower.simulations.bench.privacy import PrivacyBenchSettings

Log = Callable[[str], None]


def default_configs(num_layers: int, taps: int = 8) -> list[str]:
    """The default configuration (tail, cut at half depth, 4 bits) first, then the others the project
    offers: 8 and 2 bits, a deeper cut (three quarters), and the ladder/adapter frames (the last token
    at ``taps`` evenly spaced layers, 8 bits)."""
    half, deep = num_layers // 2, (3 * num_layers) // 4
    return [f"tail:{half}:4", f"tail:{half}:8", f"tail:{half}:2", f"tail:{deep}:4", f"ladder:{taps}:8"]


@dataclass(frozen=True)
class Exposure:
    """What one configuration sends: the states of which tokens (``nonpad``: every real token,
    ``last``: the last one) at which layers, at what bit-width."""

    name: str
    family: str  # tail | ladder (the adapter family sends what the ladder sends)
    layers: tuple[int, ...]
    token_policy: str
    bits: int


def parse_exposure(spec: str, num_layers: int) -> Exposure:
    """``tail:CUT:BITS`` (the pretrained tail cut at block CUT: every real token of block CUT-1) or
    ``ladder:TAPS:BITS`` (ladder and adapter: the last token at TAPS evenly spaced layers)."""
    parts = spec.strip().split(":")
    if len(parts) != 3 or parts[0] not in ("tail", "ladder", "adapter") or not all(p.isdigit() for p in parts[1:]):
        raise ValueError(f"configuration {spec!r}: use tail:CUT:BITS or ladder:TAPS:BITS, e.g. tail:15:4")
    family, n, bits = parts[0], int(parts[1]), int(parts[2])
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"configuration {spec!r}: bits must be one of {SUPPORTED_BITS}")
    if family == "tail":
        if not 1 <= n < num_layers:
            raise ValueError(f"configuration {spec!r}: the cut must be in 1..{num_layers - 1}")
        return Exposure(f"tail cut {n}, {bits}-bit", "tail", (n - 1,), "nonpad", bits)
    layers = tuple(evenly_spaced_layers(num_layers, min(n, num_layers)))
    return Exposure(f"ladder/adapter, last token x {len(layers)}, {bits}-bit", "ladder", layers, "last", bits)


def parse_defense(text: str) -> StateDefense:
    """``none`` or ``key=value,...`` with keys clip, noise, keep-first, keep-last, window."""
    text = text.strip()
    if text in ("", "none"):
        return StateDefense()
    values: dict[str, Any] = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if key not in ("clip", "noise", "keep_first", "keep_last", "window"):
            raise ValueError(f"defense {text!r}: unknown key {key!r} (use clip, noise, keep-first, keep-last, window)")
        values[key] = int(value) if key in ("keep_first", "keep_last", "window") else float(value)
    return StateDefense(**values)


# ---- frames: what the device sends, and what the server reads --------------------------------------------
@dataclass
class SampleSet:
    """One set of samples forwarded once: their 16-bit frames (every real token at every tapped layer)
    and each sample's token ids and own-token mask, by sample id."""

    frames: list[Frame]
    ids: dict[int, list[int]]
    own: dict[int, list[bool]]


def template_ids(backbone: Backbone, template: str) -> tuple[list[int], list[int]]:
    """The token ids of the task template's text before and after the sample's text."""
    before, _, after = template.partition("{text}")
    return backbone.token_ids([before.rstrip()])[0], backbone.segment_ids([after])[0]


def own_positions(ids: Sequence[int], before: Sequence[int], after: Sequence[int]) -> list[bool]:
    """Which positions hold the sample's own text: not the template's leading and trailing tokens."""
    start = len(before) if list(ids[: len(before)]) == list(before) else 0
    end = len(ids)
    for n in range(min(len(after), len(ids) - start), 0, -1):
        if list(ids[len(ids) - n :]) == list(after[len(after) - n :]):
            end = len(ids) - n
            break
    return [start <= j < end for j in range(len(ids))]


def forward_set(runtime: DeviceRuntime, examples: Sequence[Example], layers: Sequence[int], chunk: int) -> SampleSet:
    """The device's forward of ``examples`` in chunks: 16-bit frames at ``layers``, every real token."""
    cfg = replace(runtime.config, bits=16, token_policy="nonpad", group_size=None)
    frames = [
        runtime.make_frame(examples[at : at + chunk], layers=list(layers), config=cfg)[0]
        for at in range(0, len(examples), chunk)
    ]
    before, after = template_ids(runtime.backbone, runtime.task.template)
    encoded = runtime.encode_samples(examples)
    ids = {int(e.id): enc.ids for e, enc in zip(examples, encoded)}
    return SampleSet(frames, ids, {k: own_positions(v, before, after) for k, v in ids.items()})


class SentRows(NamedTuple):
    """The rows a frame sends, in the order it holds them, and how many each sample sends."""

    sample: torch.Tensor  # each row's sample: its index in the frame
    position: torch.Tensor  # each row's position in its sample
    length: torch.Tensor  # each row's sample's real length
    counts: list[int]  # rows per sample: the frame's token counts


def sent_rows(seq_lengths: Sequence[int], exposure: Exposure, defense: StateDefense) -> SentRows:
    """The rows a device sends of samples of ``seq_lengths`` real tokens for ``exposure`` under ``defense``,
    picked by the runtime's own rules (:func:`~mobiflower.clients.runtime.sent_mask`, ``select_tokens``,
    ``row_positions``, ``sent_counts``) over the samples right-padded as it forwards them."""
    lengths = torch.as_tensor(list(seq_lengths), dtype=torch.long)
    mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long()
    last = lengths - 1  # the token a decoder's classifier reads (Backbone.feature_positions)
    policy = exposure.token_policy
    sent = sent_mask(mask, policy, defense)
    sample_of = torch.arange(len(lengths))[:, None, None].expand(*mask.shape, 1)
    samples = select_tokens(sample_of, sent, last, policy)[:, 0]
    positions, row_lengths = row_positions(mask, sent, last, policy)
    return SentRows(samples, positions, row_lengths, sent_counts(mask, sent, policy))


def derive_frame(
    clean: Frame, exposure: Exposure, defense: StateDefense, generator: torch.Generator, seed: int = 0
) -> bytes:
    """The encoded frame a device sends for ``exposure`` under ``defense``, from its 16-bit frame."""
    group = default_group_size(exposure.bits)
    sent = sent_rows(clean.seq_lengths, exposure, defense)
    starts = torch.as_tensor(np.cumsum([0, *clean.token_counts[:-1]]), dtype=torch.long)
    index = starts[sent.sample] + sent.position  # the clean frame holds every real token of each sample
    activations = []
    for layer in exposure.layers:
        rows = dequantize(clean.activations[clean.layers.index(layer)])[index]
        rows = defend(rows, defense, generator, sent.position, sent.length)
        activations.append(concatenate([quantize(rows, exposure.bits, group, "hadamard", seed)]))
    frame = replace(
        clean,
        layers=list(exposure.layers),
        token_policy=exposure.token_policy,
        token_counts=sent.counts,
        activations=activations,
    )
    return encode_frame(frame)


def server_rows(
    blobs: Sequence[bytes], samples: SampleSet, fingerprint: str, exposure: Exposure, defense
) -> list[attacks.Rows]:
    """Decode ``blobs`` exactly as the server does (``decode_frame``, then the codec's ``dequantize``)
    and lay their rows out per layer with the token at each row's position."""
    per_layer: list[list[torch.Tensor]] = [[] for _ in exposure.layers]
    ids, own, sample, position = [], [], [], []
    for blob in blobs:
        frame = decode_frame(blob, expected_fingerprint=fingerprint)
        for j, q in enumerate(frame.activations):
            per_layer[j].append(dequantize(q))
        sent = sent_rows(frame.seq_lengths, exposure, defense)
        for i, p in zip(sent.sample.tolist(), sent.position.tolist()):
            sid = frame.sample_ids[i]
            ids.append(samples.ids[sid][p])
            own.append(samples.own[sid][p])
            sample.append(sid)
            position.append(p)
    meta = [torch.as_tensor(v) for v in (ids, own, sample, position)]
    return [attacks.Rows(torch.cat(parts), *meta) for parts in per_layer]


# ---- the run ------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """The backbone and the three sample sets, each forwarded once."""

    backbone: Backbone
    train: SampleSet
    test: SampleSet
    public: SampleSet
    forward_s: float

    @property
    def devices(self) -> SampleSet:
        """The devices' train and test samples together (their ids do not overlap)."""
        return SampleSet([], {**self.train.ids, **self.test.ids}, {**self.train.own, **self.test.own})


def prepare(backbone: Backbone, settings: PrivacyBenchSettings, exposures: Sequence[Exposure], log: Log) -> Prepared:
    """Forward the devices' train and test samples and the public pieces once each, at every layer any
    exposure taps, on the device's backbone."""
    layers = sorted({layer for e in exposures for layer in e.layers})
    runtime = DeviceRuntime(backbone, ForwardConfig(seed=settings.seed), device_id="device-0")
    splits = task_samples(settings.train_samples, 2, settings.test_samples, seed=settings.seed)
    public = attacks.public_examples(settings.public_samples, seed=settings.seed)
    t0 = time.perf_counter()
    sets = []
    for name, examples in (("train", splits.train), ("test", splits.test), ("public", public)):
        sets.append(forward_set(runtime, examples, layers, settings.chunk_size))
        log(f"forwarded {len(examples)} {name} samples at layers {layers} ({time.perf_counter() - t0:.0f} s)")
    return Prepared(backbone, *sets, forward_s=time.perf_counter() - t0)


def sent_blobs(samples: SampleSet, exposure: Exposure, defense: StateDefense, seed: int) -> list[bytes]:
    """Every frame of ``samples`` as a device sends it (noise from a generator seeded with ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    return [derive_frame(frame, exposure, defense, generator) for frame in samples.frames]


def pooled(rows: Sequence[attacks.Rows], defense: StateDefense) -> tuple[torch.Tensor, list[int]]:
    """Per sample, every layer's last sent row and mean sent row (the template's first positions left
    out): the bag-of-words attack's input [samples, 2 * layers * d], and the samples' ids."""
    first = rows[0]
    sample_ids = list(dict.fromkeys(first.sample.tolist()))
    feats = []
    for sid in sample_ids:
        at = first.sample == sid
        body = at & (first.position >= defense.keep_first)
        body = body if body.any() else at
        feats.append(torch.cat([torch.cat([r.states[at][-1], r.states[body].mean(0)]) for r in rows]))
    return torch.stack(feats), sample_ids


def own_bags(samples: SampleSet, sample_ids: Sequence[int]) -> tuple[list[set[int]], list[int]]:
    """Each sample's set of own-text token ids, and its own-token count (known to the server from the
    header's sequence length and the public template)."""
    bags = [{t for t, o in zip(samples.ids[s], samples.own[s]) if o} for s in sample_ids]
    return bags, [sum(samples.own[s]) for s in sample_ids]


def bag_attack(public: Sequence[attacks.Rows], device: Sequence[attacks.Rows], prep: Prepared, vocab, defense) -> dict:
    """Which own tokens occur, from each sample's pooled rows; with the same score for the public
    text's most frequent tokens guessed for every sample (the chance level)."""
    pub_x, pub_ids = pooled(public, defense)
    dev_x, dev_ids = pooled(device, defense)
    pub_bags, _ = own_bags(prep.public, pub_ids)
    bags, sizes = own_bags(prep.devices, dev_ids)
    scores = attacks.fit_bag_of_words(pub_x, pub_bags, vocab)(dev_x)
    prior = attacks.bag_prior(pub_bags, vocab)
    return {
        "recall": attacks.bag_recovery(scores, bags, sizes, vocab),
        "prior_recall": attacks.bag_recovery(prior.expand(len(bags), -1), bags, sizes, vocab),
    }


def inverse_attack(
    public: attacks.Rows, device: attacks.Rows, prep: Prepared, settings: PrivacyBenchSettings, defense, log: Log
) -> tuple[dict, attacks.Inverse, torch.Tensor]:
    """The learned inverses (linear, MLP) from one sent row to its token, trained on the public rows,
    scored on the devices' rows; returns the figures, the MLP and the attack's vocabulary."""
    vocab = attacks.attack_vocab(public.ids, settings.vocab)
    own = prep.devices.own
    counts = {s: sum(own[s]) for s in dict.fromkeys(device.sample.tolist())}
    out: dict[str, Any] = {"prior": attacks.prior_recovery(public.ids, device)}
    t0 = time.perf_counter()
    linear = attacks.fit_linear(public.states, public.ids, input_embeddings(prep.backbone))
    out["linear"] = attacks.token_recovery(linear.topk(device.states)[:, 0], device, linear.vocab, counts)
    t1 = time.perf_counter()
    mlp = attacks.fit_mlp(
        public.states,
        public.ids,
        vocab,
        settings.mlp_hidden,
        settings.mlp_epochs,
        seed=settings.seed,
        budget_s=settings.mlp_budget_s,
    )
    top = mlp.topk(device.states, settings.search_topk)
    out["mlp"] = attacks.token_recovery(top[:, 0], device, vocab, counts)
    out["mlp_topk"] = float((top == device.ids[:, None]).any(1)[device.own].float().mean()) if device.own.any() else 0.0
    out["fit_s"] = {"linear": t1 - t0, "mlp": time.perf_counter() - t1}
    log(
        f"  inverse: linear {out['linear']['token']:.3f}, MLP {out['mlp']['token']:.3f} of own tokens "
        f"(chance {out['prior']:.3f}; MLP top-{settings.search_topk} {out['mlp_topk']:.3f})"
    )
    return out, (linear, mlp), vocab


def input_embeddings(backbone: Backbone) -> torch.Tensor:
    """The backbone's input embedding table (public: the server holds the weights)."""
    return backbone.base.embed_tokens.weight.detach().float()


def search_attack(
    rows: attacks.Rows,
    inverses: tuple[attacks.Inverse, attacks.Inverse],
    threshold: float,
    prep: Prepared,
    exposure,
    defense,
    settings,
    log: Log,
) -> dict:
    """The white-box search on ``search_samples`` test samples drawn at random, within the time budget (the
    first sample always finishes: a loaded machine gives a slower figure, not none): both inverses'
    ``search_topk`` best candidates first, their ``search_wide`` best where none matches."""
    layer = exposure.layers[0]
    test_ids = sorted(s for s in dict.fromkeys(rows.sample.tolist()) if s in prep.test.ids)
    test_ids = random.Random(settings.seed).sample(test_ids, min(settings.search_samples, len(test_ids)))
    task = ClassificationTask()  # its template is in the run config: public
    known = template_ids(prep.backbone, task.template)[0]
    deadline = time.perf_counter() + settings.search_budget_s
    hits = total = exact = done = 0
    t0 = time.perf_counter()
    for sid in test_ids:
        at = rows.sample == sid
        opening = known if int(at.sum()) < task.max_length else []  # not cut on the left: it opens with them
        wide = torch.cat([inverse.topk(rows.states[at], settings.search_wide) for inverse in inverses], dim=1)
        candidates = torch.cat([inverse.topk(rows.states[at], settings.search_topk) for inverse in inverses], dim=1)
        found = attacks.whitebox_search(
            prep.backbone,
            layer,
            rows.states[at],
            candidates,
            defense,
            deadline if done else math.inf,  # the budget bounds the samples after the first, never the first
            wide,
            threshold,
            opening,
        )
        if found is None:
            break
        truth, own = rows.ids[at], rows.own[at]
        right = (torch.as_tensor(found) == truth) & own
        hits, total, done = hits + int(right.sum()), total + int(own.sum()), done + 1
        exact += int(right.sum()) == int(own.sum())
    out = {
        "token": hits / max(total, 1),
        "sentence": exact / max(done, 1),
        "samples": done,
        "tokens": total,
        "seconds": time.perf_counter() - t0,
        "threshold": threshold,
    }
    log(f"  white-box search: {out['token']:.3f} of own tokens on {done} samples ({out['seconds']:.0f} s)")
    return out


# ---- the task's price: side-tuning on the defended frames ----------------------------------------------------
def side_network(prep: Prepared, exposure: Exposure, settings: PrivacyBenchSettings, tails: dict):
    """A fresh side network of ``exposure``'s family, as ``mobiflower local`` builds it (the tail loads
    the public blocks above the cut, cached in ``tails`` by cut), and its training settings."""
    from mobiflower.platform.pretrained_tail import load_tail_weights
    from mobiflower.platform.side_factory import build_side_network
    from mobiflower.platform.side_networks import SideNetworkConfig
    from mobiflower.strategies.config import FAMILY_SETTINGS

    bb = prep.backbone
    defaults = FAMILY_SETTINGS[exposure.family]
    extra: dict[str, Any] = {}
    frozen = bb.frozen_head_state(lm_head=False)
    if exposure.family == "tail":
        cut = exposure.layers[0] + 1
        if cut not in tails:
            tails[cut] = load_tail_weights(settings.model, cut)
        frozen = tails[cut].weights
        extra = {"backbone_config": tails[cut].backbone_config, "lora_rank": 8, "lora_alpha": 16.0}
    config = SideNetworkConfig(
        hidden_size=bb.hidden_size,
        layers=list(exposure.layers),
        fingerprint=bb.fingerprint,
        family=exposure.family,
        reduction=8,
        dropout=0.3,
        norm_eps=float(getattr(bb.model.config, "rms_norm_eps", 1e-5)),
        bits=exposure.bits,
        group_size=default_group_size(exposure.bits),
        token_policy=exposure.token_policy,
        extra={"model": settings.model},
        **extra,
    )
    torch.manual_seed(settings.seed)
    return build_side_network(config, frozen), defaults


def side_tune(
    prep: Prepared, exposure: Exposure, train: Sequence[bytes], evals: dict[str, Sequence[bytes]], settings, tails
) -> tuple[dict, Any]:
    """Train ``exposure``'s side network on the frames ``train`` as the server does (decode, one pass
    per frame as it lands, the other epochs from the cache), then its accuracy on each of ``evals``."""
    from mobiflower.platform.precision import bf16_native
    from mobiflower.platform.trainer import SideTrainer, TrainConfig, chunk_sizes, planned_steps

    net, d = side_network(prep, exposure, settings, tails)
    tail = exposure.family == "tail"
    epochs = settings.epochs if tail else d["num-server-rounds"]  # the tail's one-device schedule; the ladder's rounds
    config = TrainConfig(
        lr=d["lr"],
        weight_decay=d["weight-decay"],
        epochs=epochs,
        batch_size=d["batch-size"],
        seed=settings.seed,
        average_epochs=min(d["average-epochs"], epochs),
        mixed_precision="bf16" if tail and bf16_native() else "none",  # the run config's "auto"
    )
    steps = planned_steps(chunk_sizes(settings.train_samples, settings.chunk_size), config.batch_size, epochs)
    trainer = SideTrainer(net, config, total_steps=steps)
    fingerprint = prep.backbone.fingerprint
    for blob in train:
        trainer.ingest(decode_frame(blob, expected_fingerprint=fingerprint))
    for epoch in range(1, epochs + 1):
        if epoch > 1:
            trainer.train_epoch()
        if trainer.averaging(epoch):
            trainer.update_average()
    trainer.use_average()
    out = {"train_s": trainer.train_seconds, "epochs": epochs}
    for name, blobs in evals.items():
        frames = [decode_frame(b, expected_fingerprint=fingerprint) for b in blobs]
        out[name] = trainer.evaluate(frames)["accuracy"]
    return out, trainer


@torch.no_grad()
def class_probabilities(trainer, blobs: Sequence[bytes], fingerprint: str) -> tuple[np.ndarray, np.ndarray]:
    """The trained network's predicted probabilities and the true labels of the samples in ``blobs``:
    what a label-private server would send, and what its residuals would be computed from."""
    probs, labels = [], []
    trainer.net.eval()
    for blob in blobs:
        decoded = trainer.decode(decode_frame(blob, expected_fingerprint=fingerprint))
        for start in range(0, len(decoded), 32):
            batch = decoded.batch(list(range(start, min(start + 32, len(decoded)))))
            probs.append(torch.softmax(trainer.net(batch).float(), dim=1))
            labels.append(batch.targets)
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


# ---- one configuration under one defense, and the whole bench ----------------------------------------------
def measure(
    prep: Prepared, exposure: Exposure, defense: StateDefense, settings, tails: dict, log: Log, accuracy: bool = True
):
    """Every figure of ``exposure`` under ``defense`` (the accuracy only with ``accuracy``); and the
    trained side network's trainer (or None)."""
    fp, seed = prep.backbone.fingerprint, settings.seed
    public = server_rows(sent_blobs(prep.public, exposure, defense, seed + 1), prep.public, fp, exposure, defense)
    train = sent_blobs(prep.train, exposure, defense, seed + 2)
    test = sent_blobs(prep.test, exposure, defense, seed + 3)
    device = server_rows(train + test, prep.devices, fp, exposure, defense)
    n = settings.train_samples + settings.test_samples
    row: dict[str, Any] = {
        "exposure": asdict(exposure),
        "defense": {**asdict(defense), "label": defense.describe(), **privacy_loss(defense)},
        "bytes_per_sample": sum(len(b) for b in train + test) / n,
        "rows_per_sample": len(device[0].ids) / n,
    }
    if exposure.token_policy == "nonpad":
        row["inverse"], inverses, _ = inverse_attack(public[0], device[0], prep, settings, defense, log)
        if defense.window == 0 and settings.search_samples > 0:
            clean = server_rows(
                sent_blobs(prep.public, replace(exposure, bits=16), StateDefense(), seed),
                prep.public,
                fp,
                exposure,
                defense,
            )
            body = clean[0].position >= max(1, defense.keep_first)  # not the attention sink's outsized row
            threshold = attacks.match_threshold(clean[0].states[body], public[0].states[body], defense)
            row["search"] = search_attack(device[0], inverses, threshold, prep, exposure, defense, settings, log)
    if exposure.token_policy == "last" or defense.window:
        vocab = attacks.attack_vocab(torch.tensor([t for ids in prep.public.ids.values() for t in ids]), settings.vocab)
        row["bag"] = bag_attack(public, device, prep, vocab, defense)
        log(f"  bag of words: {row['bag']['recall']:.3f} of own tokens (chance {row['bag']['prior_recall']:.3f})")
    trainer = None
    if accuracy:
        clean = sent_blobs(prep.test, replace(exposure, bits=16), StateDefense(), seed)
        row["accuracy"], trainer = side_tune(prep, exposure, train, {"clean": clean, "sent": test}, settings, tails)
        log(
            f"  test accuracy {row['accuracy']['clean']:.3f} on clean states, {row['accuracy']['sent']:.3f} on "
            f"frames as sent ({row['accuracy']['train_s']:.0f} s of training)"
        )
    return row, trainer


def measure_all(settings: PrivacyBenchSettings, log: Log) -> dict:
    """The bench's rows (every configuration undefended, the first one under each defense), the label
    figures, the sent rows' norms and the forward's time."""
    torch.set_num_threads(settings.threads or os.cpu_count() or 1)
    defenses = [parse_defense(d) for d in settings.defenses]
    backbone = Backbone.load(settings.model, weights=settings.weights)
    specs = settings.configs or default_configs(backbone.num_layers)
    exposures = [parse_exposure(spec, backbone.num_layers) for spec in specs]
    prep = prepare(backbone, settings, exposures, log)
    rows, tails, labels = [], {}, None
    for i, exposure in enumerate(exposures):
        for defense in [StateDefense()] + (defenses if i == 0 else []):
            log(f"{exposure.name}, defense: {defense.describe()}")
            accuracy = settings.accuracy == "all" or (settings.accuracy == "first" and i == 0)
            row, trainer = measure(prep, exposure, defense, settings, tails, log, accuracy)
            rows.append(row)
            if i == 0 and not defense.active and trainer is not None:
                test = sent_blobs(prep.test, exposure, defense, settings.seed + 3)
                probs, truth = class_probabilities(trainer, test, backbone.fingerprint)
                labels = attacks.label_recovery(probs, truth, settings.label_epsilons, settings.seed)
    first = prep.train.frames[0]
    return {
        "rows": rows,
        "label_private": labels,
        "state_norms": norm_quantiles(dequantize(first.activations[first.layers.index(exposures[0].layers[0])])),
        "forward_s": prep.forward_s,
    }


def norm_quantiles(states: torch.Tensor) -> dict[str, float]:
    """Quantiles of the sent rows' L2 norms (the attention sink's outsized rows left out): where a clip
    norm sits."""
    norms = states.norm(dim=1)
    norms = norms[norms < 10 * norms.median()]
    q = torch.quantile(norms, torch.tensor([0.1, 0.5, 0.9, 0.99]))
    return {"p10": float(q[0]), "median": float(q[1]), "p90": float(q[2]), "p99": float(q[3])}
