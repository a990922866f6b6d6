"""Devices as JSON-ready dicts: one shape whether the CLI asks the kernel or the daemon does."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from vdpad.mgmt import model
from vdpad.mgmt.binding import Binding
from vdpad.mgmt.model import Device


def device_record(d: Device, bound: Binding | None) -> dict[str, Any]:
    record = asdict(d)
    record["class"] = model.class_name(d.device_id)
    record["driver"] = bound.driver if bound else None
    record["node"] = str(bound.node) if bound and bound.node else None
    record["virtio"] = bound.virtio if bound else None
    record["kernel_devices"] = list(bound.kernel_devices) if bound else []
    return record
