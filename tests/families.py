"""Run-config keys that put a test's run on the ladder family with the ladder's own settings.

The default family is the pretrained tail; tests of plumbing that is not about the family
(faults, fleets, paging) keep the small, fast ladder and the settings it was measured with."""

LADDER = {"family": "ladder", "lr": 3e-4, "weight-decay": 0.1, "batch-size": 32, "rounds": 20, "average-epochs": 5,
          "token-policy": "last"}
