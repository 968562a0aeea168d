"""``mobiflower bench device``'s vocabulary, shared by its runs (classification and causal-LM), the
measuring child and the report: the methods, the wire sizes measured, the acceptance lines and
the figures reported beside them, the training baselines' settings, and the samples every method
forwards.

A module of its own, below :mod:`~mobiflower.simulations.bench.device`,
:mod:`~mobiflower.simulations.bench.device_lm` and :mod:`~mobiflower.simulations.bench.device_report`,
so that each of them can read it without importing the others.
"""

from __future__ import annotations

TASKS = ("classification", "causal-lm")
METHODS = ("mobiflower_device", "tail_device", "inference_forward", "lora_step", "full_step")
DEVICE_KINDS = ("mobiflower_device", "tail_device")
TRAINING_METHODS = ("lora_step", "full_step")
TAIL_CUT = 0  # the pretrained tail's default cut: half the blocks (strategies.config.SideTuningConfig.tail_cut)
WIRE_BITS = (16, 8, 4, 2)
WIRE_POLICIES = ("all", "nonpad", "last")
ACCEPTANCE = {
    # name: (ratio key, comparison, threshold)
    "device_rss_le_1.15x_inference": ("device_vs_inference_rss", "<=", 1.15),
    "device_rss_le_0.25x_full": ("device_vs_full_rss", "<=", 0.25),
    "device_rss_le_0.5x_lora": ("device_vs_lora_rss", "<=", 0.5),
    "device_s_le_1.2x_inference": ("device_vs_inference_s", "<=", 1.2),
    "lora_s_ge_2.5x_device": ("lora_vs_device_s", ">=", 2.5),
    "fp32_all_ge_100x_4bit_last": ("fp32_all_vs_4bit_last_bytes", ">=", 100.0),
    "tail_rss_le_1.0x_inference": ("tail_vs_inference_rss", "<=", 1.0),
    "tail_s_le_0.7x_inference": ("tail_vs_inference_s", "<=", 0.7),
}
BILLION_ACCEPTANCE = {
    # issue 16, on a billion-sized backbone: the fp32 device against the on-device methods, the
    # low-precision devices' whole-process peak, and the device's memory across training configurations;
    # a fourth entry names a flag that also passes the line (full fine-tuning out of memory under 20 GB)
    "device_rss_le_1.1x_inference": ("device_vs_inference_rss", "<=", 1.1),
    "device_rss_le_0.3x_full": ("device_vs_full_rss", "<=", 0.3, "full_step_oom_under_20gb"),
    "device_s_le_0.4x_lora": ("device_vs_lora_s", "<=", 0.4),
    "tail_rss_le_1.1x_inference": ("tail_vs_inference_rss", "<=", 1.1),
    "tail_rss_le_0.3x_full": ("tail_vs_full_rss", "<=", 0.3, "full_step_oom_under_20gb"),
    "tail_s_le_0.4x_lora": ("tail_vs_lora_s", "<=", 0.4),
    "int4_device_peak_le_1.3GB": ("int4_device_peak_rss_gb", "<=", 1.3),
    "int4_device_rss_le_0.2x_lora": ("int4_device_vs_lora_rss", "<=", 0.2),
    "int8_device_peak_le_2.0GB": ("int8_device_peak_rss_gb", "<=", 2.0),
    "device_rss_spread_le_10pct": ("device_rss_spread", "<=", 0.10),
    "tail_rss_spread_le_10pct": ("tail_rss_spread", "<=", 0.10),
}
REPORTED_RATIOS = (
    "device_vs_lora_rss",
    "tail_vs_lora_rss",
    "device_vs_inference_s",
    "tail_vs_inference_s",
    "int4_tail_peak_rss_gb",
    "int8_tail_peak_rss_gb",
    "lora_rss_spread",
    "full_rss_spread",
)
"""Issue 16's figures printed beside the verdicts: LoRA's memory against the device's, and how far
LoRA's and full fine-tuning's peaks move across the training configurations."""
LORA_SETTINGS = {"r": 8, "alpha": 16, "dropout": 0.05}
LR = {"lora_step": 5e-4, "full_step": 2e-5}
MAX_LENGTH = 256  # tokens: Backbone's and the baselines' truncation

CAUSAL_LM_METHODS = ("tail_device", "inference_forward", "lora_step", "full_step")
CAUSAL_LM_DEFAULTS: dict[str, int] = {"batches": 5, "batch_size": 4, "seq_len": 256}
"""5 batches of 4 samples (one warm-up, 16 timed) of 256 tokens: the same batch size for every method."""
CAUSAL_LM_BITS = 4  # the tail's frames (strategies.config.FAMILY_DEFAULTS["tail"]["bits"])
CAUSAL_LM_ACCEPTANCE = {
    # issue 25: the causal-LM run's device against running the model
    "tail_rss_le_1.0x_inference": ("tail_vs_inference_rss", "<=", 1.0),
    "tail_s_le_0.7x_inference": ("tail_vs_inference_s", "<=", 0.7),
}
CAUSAL_LM_REPORTED = (
    "tail_vs_inference_cpu_s",
    "lora_vs_tail_s",
    "lora_vs_tail_cpu_s",
    "full_vs_tail_s",
    "lora_vs_tail_rss",
    "full_vs_tail_rss",
    "lora_vs_inference_rss",
    "full_vs_inference_rss",
)
"""Figures printed beside the verdicts (no bound): on-device training against the tail device."""


def bench_samples(batches: int, batch_size: int, seed: int = 0, seq_len: int = 0) -> list:
    """The first ``batches * batch_size`` training samples (of at least the default 2000 drawn).

    ``seq_len`` > 0 lengthens each text with the snippets after it until it has at least that many
    words (so at least that many tokens: truncated to exactly ``seq_len`` where it is read).
    """
    from mobiflower.platform.data import Example, task_samples

    n = batches * batch_size
    train = task_samples(max(2000, n), 2, 2, seed).train
    if len(train) < n:
        raise ValueError(f"only {len(train)} training samples exist, the bench needs {n}")
    if not seq_len:
        return train[:n]
    samples = []
    for i, e in enumerate(train[:n]):
        words, j = e.text.split(), i + 1
        while len(words) < seq_len:
            words += train[j % len(train)].text.split()
            j += 1
        samples.append(Example(e.id, " ".join(words), e.label))
    return samples


def random_weights(model: str) -> bool:
    from mobiflower.platform.shapes import is_shape

    return is_shape(model)
