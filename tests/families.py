"""Run-config keys that put a test's run on the ladder family with the ladder's own settings.

The default family is the pretrained tail; tests of plumbing that is not about the family
(faults, fleets, paging) keep the small, fast ladder and the settings it was measured with."""

from mobiflower.strategies.config import FAMILY_SETTINGS

LADDER = {**FAMILY_SETTINGS["ladder"], "family": "ladder", "token-policy": "last"}
