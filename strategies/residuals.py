"""Label-private training: the devices, not the server, turn predictions into gradients.

A trainer calls :meth:`ResidualOracle.__call__` inside a training step (the trainer thread while
streaming, the main thread in cached rounds) with a batch's sample ids and predicted probabilities;
each device owning some of them answers ``p - onehot(y)`` for its rows
(:mod:`mobiflower.platform.label_private`).
"""

from __future__ import annotations

from typing import Mapping

import torch
from flwr.serverapp import Grid

from mobiflower.platform import messages as m
from mobiflower.platform.messages import BackboneChoice, ResidualRequest
from mobiflower.strategies.grid_requests import config_bytes, failed, request_all, why
from mobiflower.strategies.reply_checks import residual_reply
from mobiflower.strategies.run_state import FleetError, RunState


class ResidualOracle:
    """Asks the devices for residuals; ``owners`` maps a sample id to the device that holds it (the
    frame intake's record, :class:`~mobiflower.platform.intake.SampleOwners`, read here only)."""

    def __init__(
        self,
        grid: Grid,
        state: RunState,
        backbones: Mapping[int, BackboneChoice],
        timeout: float,
        owners: Mapping[int, str],
    ):
        self.grid, self.state, self.backbones, self.timeout = grid, state, backbones, timeout
        self.owners = owners

    def __call__(self, sample_ids: list[int], probs: torch.Tensor) -> torch.Tensor:
        """``p - onehot(y)`` per row. Rows of a device that fails to answer, or answers malformed, stay
        NaN and are left out of the step; the failure is recorded on the device."""
        by_node: dict[int, list[int]] = {}
        node_of = {d.device_id: n for n, d in self.state.devices.items()}
        for row, sample_id in enumerate(sample_ids):
            device = self.owners.get(int(sample_id))
            if device is None or device not in node_of:
                raise FleetError(f"no device is known to own sample {sample_id}: cannot ask for its residual")
            by_node.setdefault(node_of[device], []).append(row)
        out = torch.full_like(probs, float("nan"), dtype=torch.float32)
        messages = []
        for node_id, rows in by_node.items():
            request = ResidualRequest(
                sample_ids=tuple(int(sample_ids[r]) for r in rows),
                num_classes=int(probs.shape[1]),
                probs=probs[rows].float().numpy(),
                backbone=self.backbones.get(node_id, BackboneChoice()),
            )
            content = request.to_content()
            self.state.devices[node_id].add(
                bytes_down=m.array_bytes(content[m.PROBS_KEY]) + config_bytes(content[m.CONFIG_KEY])
            )
            messages.append(request.to_message(node_id, self.timeout))
        for node_id, reply in request_all(self.grid, messages, self.timeout).items():
            dev, rows = self.state.devices[node_id], by_node[node_id]
            if failed(reply):
                dev.fail(f"residual: {why(reply)}")
                continue
            try:
                residual = residual_reply(reply, len(rows), int(probs.shape[1])).residual
            except Exception as err:  # noqa: BLE001 - its rows stay NaN: left out of the step
                dev.refuse(err, "residual")
                continue
            dev.add(bytes_up=residual.nbytes)
            dev.count("residual_requests")
            out[rows] = torch.as_tensor(residual, dtype=torch.float32)
        return out
