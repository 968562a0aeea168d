"""The side-tuning run's settings, read from Flower's run config (``[tool.flwr.app.config]`` and ``-c``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from mobiflower.platform.run_config import as_config, typed_fields
from mobiflower.platform.side_store import MODES
from mobiflower.platform.tasks import TaskConfig

# Each side-network family's optimisation settings, as run-config keys: the tail's are the declared
# defaults; ladder and adapter train best with these (RESULTS.md). `mobiflower simulate --family`
# applies them (a -c key still wins).
# ladder and adapter are side networks trained from scratch: they share one schedule
_FROM_SCRATCH: dict[str, Any] = {
    "lr": 3e-4,
    "weight-decay": 0.1,
    "batch-size": 32,
    "num-server-rounds": 20,
    "average-epochs": 5,
    "bits": 8,
}
FAMILY_SETTINGS: dict[str, dict[str, Any]] = {
    "tail": {"lr": 1e-3, "weight-decay": 0.0, "batch-size": 16, "num-server-rounds": 1, "average-epochs": 0, "bits": 4},
    "ladder": dict(_FROM_SCRATCH),
    "adapter": dict(_FROM_SCRATCH),
}


class ConfigError(ValueError):
    """A run-config value is invalid; the message names the key and what is allowed."""


@dataclass(frozen=True)
class SideTuningConfig:
    """Every knob of a federated side-tuning run; the run-config key is the field name with dashes.

    Frozen: a run reads it from start to end, so nothing may change it under the run (to run with other
    settings, make a checked copy with :func:`dataclasses.replace`)."""

    # side networks and optimisation (server side)
    mode: str = "shared"  # shared | per-device | hybrid
    family: str = "tail"  # tail (pretrained upper blocks + LoRA) | ladder | adapter
    tail_cut: int = 0  # tail: devices forward blocks 0..cut-1, the server trains blocks cut.. with LoRA (0 = half)
    lora_r: int = 8  # tail: LoRA rank (PEFT's r), alpha and the modules it wraps (target_modules, comma-separated)
    lora_alpha: float = 16.0
    lora_target_modules: str = "q_proj,v_proj"
    mixed_precision: str = "auto"  # server training: none | bf16 | auto (bf16 for the tail where the CPU has it)
    reduction: int = 8
    dropout: float = 0.3
    lr: float = 1e-3  # the tail's (picked on validation over 1e-3 / 2e-3, RESULTS.md); ladder / adapter train best near 3e-4 (weight-decay 0.1, batch 32, 20 rounds)
    weight_decay: float = 0.0
    batch_size: int = 16
    # Flower's rounds of the ServerApp. Here one server round is one epoch over the fleet's training samples:
    # every device streams (or, from the cache, replays) each of its training samples once and the server
    # trains on them in batch-size steps; so num-server-rounds = epochs over the data
    num_server_rounds: int = 1
    average_epochs: int = 0  # deliver the mean weights of the last k server rounds (tail averaging); 0 = the last
    activation_cache: bool = True  # later rounds train from cached activations: devices forward once
    cache_mb: int = 2048
    side_memory_mb: float = (
        0.0  # per-device mode: side networks resident beyond this are paged to run-dir (0 = all in memory)
    )
    aggregate_every: int = 0  # per-device mode: FedAvg of the device networks every k rounds (0 = never)
    personal_epochs: int = 3  # hybrid mode: head-only epochs per personalisation
    personal_lr: float = 1e-3
    # hybrid mode: how many personal epochs a device keeps: "validation", the count (0 to personal-epochs)
    # that scores best on that device's validation frames (forwarded once); "last", all of them
    personal_select: str = "validation"
    seed: int = 0  # the data split and partition (devices) and, unless train-seed is set, the training
    train_seed: int = -1  # the side network's initial weights and the trainer's shuffles (-1 = seed)
    server_threads: int = (
        1  # torch threads of the server's training while devices stream (they share a simulation's cores)
    )
    cache_threads: int = 0  # ... and in cached rounds, when the devices are idle (0 = every core)
    label_private: bool = False  # labels stay on the devices; each step asks them for residuals p - onehot(y)
    label_epsilon: float = 0.0  # label-private: randomized-response epsilon per sample (0 = exact labels, no DP)
    # what devices send (the strategy may later adapt these per device)
    chunk_size: int = 64  # samples per forward request (one frame)
    in_flight: int = 2  # forward requests kept in flight per device
    send_window: int = 16  # requests carrying a side network (evaluate, deliver) in flight at once, fleet-wide
    overlap: bool = True  # train on frames in a background thread while pulling; false = serial baseline
    device_batch_size: int = 16
    bits: int = 4  # the tail's frames (every real token: 4 bits cost it no measurable accuracy); ladder 8
    token_policy: str = "auto"  # last | nonpad | all | auto (nonpad for the tail, last otherwise)
    # fleets: links, scheduling and adaptation
    fleet: str = ""  # simulation: a fleet (name or TOML path) whose links and speeds drive a virtual clock
    adapt: bool = False  # per device, pick bit-width and tapped layers to finish streaming by the deadline
    adapt_min_bits: int = 4  # adaptation never sends fewer bits than this (8, 4 or 2)
    adapt_min_taps: int = 0  # ... nor fewer tapped layers (0 = half of them, rounded up)
    deadline_s: float = 0.0  # the streaming round's deadline in seconds (0 = what the median device needs)
    # evaluation, delivery, output
    eval_initial: bool = False  # score the untrained side network on the devices' test splits first (a baseline)
    eval_every: int = 5  # on-device validation every k rounds (0 = only the final test)
    eval_samples: int = 64  # cap per device for periodic validation (0 = all); the final test uses all
    eval_split: str = "validation"  # what periodic evaluation scores: validation, or test (for time-to-accuracy curves)
    # where periodic evaluation runs: "server" (devices forward those samples once, the server scores every
    # later network on the kept frames, no network goes down) or "device" (the network is sent to each device)
    eval_on: str = "server"
    deliver: bool = True
    request_timeout: float = 900.0  # seconds a device may take to answer one request
    max_retries: int = 1  # a failed forward request is retried this many times before the device is dropped
    resume: bool = False  # continue the run in run-dir from its last checkpoint
    crash_after_round: int = 0  # fault injection for tests: SIGKILL the server right after round k's checkpoint
    run_dir: str = ""  # where checkpoints and the summary go ("" = $MOBIFLOWER_HOME/runs/<run id>)
    # what the fleet fine-tunes for (run-config keys task, labels, prompt-template, max-length; read by devices too)
    task: TaskConfig = field(default_factory=TaskConfig)

    def __post_init__(self) -> None:
        self._check_task()
        self._check_side_network()
        self._check_counts_and_memory()
        self._check_eval_and_adaptation()
        self._check_label_privacy()

    def _check_side_network(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r} is unknown: use one of {', '.join(MODES)}")
        if self.family not in ("tail", "ladder", "adapter"):
            raise ConfigError(f"family={self.family!r} is unknown: use 'tail', 'ladder' or 'adapter'")
        if self.token_policy not in ("last", "nonpad", "all", "auto"):
            raise ConfigError(f"token-policy={self.token_policy!r} is unknown: use 'last', 'nonpad', 'all' or 'auto'")
        if self.family == "tail" and self.token_policy == "last":
            raise ConfigError(
                "family 'tail' reads every real token of the cut layer: set token-policy = 'nonpad' (or 'auto')"
            )
        if self.family == "tail" and (
            self.tail_cut < 0 or self.lora_r < 1 or self.lora_alpha <= 0 or not self.lora_target_list
        ):
            raise ConfigError(
                f"tail-cut={self.tail_cut} must be >= 0 (0 = half the blocks), lora-r={self.lora_r} "
                f"at least 1, "
                f"lora-alpha={self.lora_alpha} positive, lora-target-modules={self.lora_target_modules!r} non-empty"
            )
        if self.mixed_precision not in ("none", "bf16", "auto"):
            raise ConfigError(f"mixed-precision={self.mixed_precision!r} is unknown: use 'none', 'bf16' or 'auto'")

    def _check_counts_and_memory(self) -> None:
        for name in (
            "num_server_rounds",
            "chunk_size",
            "in_flight",
            "send_window",
            "batch_size",
            "device_batch_size",
            "reduction",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("aggregate_every", "eval_every", "eval_samples", "max_retries", "personal_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if self.aggregate_every and self.mode != "per-device":
            raise ConfigError(
                f"aggregate-every={self.aggregate_every} averages per-device side networks: "
                f"set mode = 'per-device' or aggregate-every = 0"
            )
        if self.activation_cache and self.cache_mb < 1:
            raise ConfigError(
                f"cache-mb={self.cache_mb}: the activation cache needs at least 1 MB, or set activation-cache = false"
            )
        if self.side_memory_mb < 0:
            raise ConfigError(
                f"side-memory-mb={self.side_memory_mb} must be >= 0 (0 keeps every side network in memory)"
            )
        if self.side_memory_mb and self.mode != "per-device":
            raise ConfigError(
                f"side-memory-mb={self.side_memory_mb} pages per-device side networks to disk: set "
                f"mode = 'per-device', or side-memory-mb = 0 (one shared network is always resident)"
            )

    def _check_eval_and_adaptation(self) -> None:
        if self.personal_select not in ("validation", "last"):
            raise ConfigError(f"personal-select={self.personal_select!r} is unknown: use 'validation' or 'last'")
        if self.eval_on not in ("server", "device"):
            raise ConfigError(f"eval-on={self.eval_on!r} is unknown: use 'server' or 'device'")
        if self.eval_split not in ("validation", "test"):
            raise ConfigError(f"eval-split={self.eval_split!r} is unknown: use 'validation' or 'test'")
        if self.adapt_min_bits not in (2, 4, 8) or self.adapt_min_bits > self.bits:
            raise ConfigError(f"adapt-min-bits={self.adapt_min_bits} must be 2, 4 or 8, and at most bits={self.bits}")
        if self.adapt_min_taps < 0:
            raise ConfigError(f"adapt-min-taps={self.adapt_min_taps} must be >= 0 (0 = half of the tapped layers)")
        if self.deadline_s < 0:
            raise ConfigError(f"deadline-s={self.deadline_s} must be >= 0 (0 = set from the median device)")
        if self.adapt and self.bits not in (8, 4, 2):
            raise ConfigError(
                f"adapt = true starts from bits={self.bits}: use bits = 8 (or 4), the codec's "
                f"quantized widths the policy steps down through"
            )

    def _check_label_privacy(self) -> None:
        if self.label_epsilon < 0:
            raise ConfigError(f"label-epsilon={self.label_epsilon} must be >= 0 (0 = no randomized response)")
        if self.label_epsilon and not self.label_private:
            raise ConfigError(
                f"label-epsilon={self.label_epsilon} only applies to a label-private run: set "
                f"label-private = true, or label-epsilon = 0"
            )
        if self.label_private and self.mode == "hybrid":
            raise ConfigError(
                "label-private = true cannot run mode 'hybrid': its personal heads are fine-tuned on "
                "the server, which would need labels. Use mode 'shared' or 'per-device'"
            )
        if self.mode == "hybrid" and not self.activation_cache:
            raise ConfigError(
                "mode 'hybrid' fine-tunes personal heads from the activation cache: set activation-cache = true"
            )

    def _check_task(self) -> None:
        if self.task.task != "causal-lm":
            return
        if self.family != "tail":
            raise ConfigError(
                f"task 'causal-lm' trains the pretrained tail with the backbone's LM head; family "
                f"{self.family!r} has no on-device generation path: use family = 'tail'"
            )
        if self.label_private:
            raise ConfigError(
                "label-private = true cannot run task 'causal-lm': its targets are the next tokens of the "
                "device's own text, and a label-private residual over a 49k-token vocabulary (and its "
                "gradient) would name each token anyway. Run causal-lm without label-private"
            )

    @property
    def head(self) -> str:
        """The side network's head for the task: ``classification`` or ``lm``."""
        return self.task.build().head

    @property
    def frame_token_policy(self) -> str:
        """The tokens frames carry: ``token-policy``, where ``auto`` is the family's own choice."""
        if self.token_policy != "auto":
            return self.token_policy
        return "nonpad" if self.family == "tail" else "last"

    @property
    def train_precision(self) -> str:
        """``mixed-precision`` resolved: ``auto`` is bf16 for the tail where the CPU computes bf16 natively."""
        if self.mixed_precision != "auto":
            return self.mixed_precision
        from mobiflower.platform.precision import bf16_native

        return "bf16" if self.family == "tail" and bf16_native() else "none"

    @property
    def training_seed(self) -> int:
        """``train-seed`` resolved: training's own randomness, so one data split can be trained several times."""
        return self.seed if self.train_seed < 0 else self.train_seed

    @property
    def lora_target_list(self) -> list[str]:
        return [t.strip() for t in self.lora_target_modules.split(",") if t.strip()]

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "SideTuningConfig":
        """Pick this config's keys out of the run config (other keys belong to the devices)."""
        own = [f.name for f in dataclasses.fields(cls) if f.name != "task"]
        return cls(
            **typed_fields(cls, run_config, only=own, error=ConfigError),
            task=TaskConfig.from_run_config(run_config),
        )

    def as_dict(self) -> dict[str, Any]:
        """Every run-config key this config reads, the task's included (what from_run_config reads back)."""
        values = {k: v for k, v in as_config(self).items() if k != "task"}
        return {**values, **as_config(self.task)}
