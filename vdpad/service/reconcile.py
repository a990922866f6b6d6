"""The configured devices against those on the vdpa bus: make the missing, report the rest.

Synchronous (netlink and sysfs block): the daemon runs it in a worker thread
through vdpad.mgmt.aio.run. It never changes nor deletes a device that
exists, and does not look at one a session uses; one device failing does not
stop the others.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import structlog

from vdpad.device.flags import VirtioDeviceId
from vdpad.mgmt import binding, lifecycle, model
from vdpad.mgmt.binding import Binding
from vdpad.mgmt.errors import NotFound
from vdpad.mgmt.model import Device, DeviceConfig
from vdpad.mgmt.netlink import VdpaNetlink
from vdpad.service.config import DeviceSpec

log = structlog.get_logger("vdpad.service")


@dataclass(frozen=True)
class Difference:
    attribute: str
    wanted: Any
    found: Any


@dataclass(frozen=True)
class Differing:
    device: str
    differences: tuple[Difference, ...]


@dataclass(frozen=True)
class Failed:
    device: str
    error: str  # the error's text, with its notes


@dataclass(frozen=True)
class Report:
    created: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    differing: tuple[Differing, ...] = ()
    in_use: tuple[str, ...] = ()
    failed: tuple[Failed, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "created": list(self.created),
            "unchanged": list(self.unchanged),
            "differing": [{"device": d.device, "differences": [asdict(x) for x in d.differences]}
                          for d in self.differing],
            "in_use": list(self.in_use),
            "failed": [{"device": f.device, "error": f.error} for f in self.failed],
        }


def reconcile(nl: VdpaNetlink, specs: Sequence[DeviceSpec], in_use: Collection[str]) -> Report:
    """Attach each spec's device that is missing; compare each that exists; leave alone those `in_use`."""
    created: list[str] = []
    unchanged: list[str] = []
    differing: list[Differing] = []
    used: list[str] = []
    failed: list[Failed] = []
    for spec in specs:
        if spec.name in in_use:
            used.append(spec.name)
            log.info("reconcile.device", device=spec.name, action="in_use")
            continue
        try:
            found = _reconcile_one(nl, spec)
        except (OSError, ValueError) as error:  # the kernel's, sysfs's or the attach checks' refusal
            text = "; ".join([str(error), *getattr(error, "__notes__", ())])
            failed.append(Failed(spec.name, text))
            log.warning("reconcile.device", device=spec.name, action="failed", error=text)
        else:
            if found is None:
                created.append(spec.name)
                log.info("reconcile.device", device=spec.name, action="created")
            elif found:
                differing.append(Differing(spec.name, found))
                log.warning("reconcile.device", device=spec.name, action="differing",
                            differences=[(d.attribute, d.wanted, d.found) for d in found])
            else:
                unchanged.append(spec.name)
                log.info("reconcile.device", device=spec.name, action="unchanged")
    return Report(tuple(created), tuple(unchanged), tuple(differing), tuple(used), tuple(failed))


def _reconcile_one(nl: VdpaNetlink, spec: DeviceSpec) -> tuple[Difference, ...] | None:
    """None when the device was made; else how the one that exists differs from `spec`."""
    try:
        device = nl.device(spec.name)
    except NotFound:
        lifecycle.attach(nl, spec.name, spec.mgmtdev, mac=spec.mac, mtu=spec.mtu, max_vqp=spec.max_vqp,
                         features=spec.features, driver=spec.driver)
        return None
    return differences(spec, device, nl.config(spec.name), binding.binding_of(spec.name))


def differences(spec: DeviceSpec, device: Device, config: DeviceConfig, bound: Binding) -> tuple[Difference, ...]:
    """What of `spec` the existing device is not, as far as the kernel reports it."""
    wanted_found: list[tuple[str, Any, Any]] = [("mgmtdev", spec.mgmtdev, device.mgmtdev)]
    net_wanted = {"mac": spec.mac, "mtu": spec.mtu, "max_vqp": spec.max_vqp}
    if config.net is None:
        if any(v is not None for v in net_wanted.values()):
            wanted_found.append(("class", VirtioDeviceId.NET.class_name, model.class_name(device.device_id)))
    else:
        # The kernel reports each exactly when the device offers its feature (MAC, MTU, MQ or RSS), which
        # DEV_NEW demands with the attribute: one not reported is a difference (found None).
        net_found = {"mac": config.net.mac, "mtu": config.net.mtu, "max_vqp": config.net.max_vq_pairs}
        wanted_found += [(key, wanted, net_found[key]) for key, wanted in net_wanted.items() if wanted is not None]
    if spec.features is not None and config.features is not None:  # None: a kernel that does not say
        wanted_found.append(("features", spec.features, config.features))
    # Bound to nothing (found None) differs too.
    wanted_found.append(("driver", spec.driver.value, bound.driver))
    return tuple(Difference(a, w, f) for a, w, f in wanted_found if w != f)
