"""Memory a client hands the daemon (a memfd it passed, or one the daemon made), held by name.

A session holds the memory its own device maps; a domain holds the memory its
mappings point into, for every device attached to it. Either way a region
refuses to close while a device maps it (RegionInUse), and lives until its
holder closes.
"""

from __future__ import annotations

from vdpad.device.errors import InvalidArgument
from vdpad.iotlb import MemoryRegion


class MemoryHolder:
    """Named regions (`regions`), for a holder that says what it is (`holder`, `holder_device`)."""

    regions: dict[str, MemoryRegion]

    @property
    def holder(self) -> str:
        """How errors name the holder: "session 3", "domain vm1"."""
        raise NotImplementedError

    @property
    def holder_device(self) -> str:
        """What errors name as the device."""
        raise NotImplementedError

    def _check_new_name(self, name: str) -> None:
        if not name or len(name) > 64 or not name.isprintable():
            raise InvalidArgument("memory", self.holder_device, f"memory name {name!r} must be 1-64 printable characters")
        if name in self.regions:
            raise InvalidArgument("memory", self.holder_device, f"{self.holder} has memory {name!r} already")

    def register(self, name: str, fd: int, offset: int, size: int) -> MemoryRegion:
        self._check_new_name(name)
        region = MemoryRegion.from_fd(fd, offset, size, name=name)
        self.regions[name] = region
        return region

    def allocate(self, name: str, size: int) -> MemoryRegion:
        self._check_new_name(name)
        region = self.regions[name] = MemoryRegion(size, name)
        return region

    def release(self, name: str) -> None:
        region = self.region(name)
        region.close()  # RegionInUse while mapped: the region stays
        del self.regions[name]

    def region(self, name: str) -> MemoryRegion:
        try:
            return self.regions[name]
        except KeyError:
            known = ", ".join(sorted(self.regions)) or "none"
            raise InvalidArgument("memory", self.holder_device,
                                  f"{self.holder} has no memory {name!r} (registered: {known})") from None
