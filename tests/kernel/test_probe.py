"""The first contact with the kernel through the cffi layer: what each simulator device offers."""

import pytest

from vdpad.device import BackendFeature, VhostVdpa

pytestmark = pytest.mark.kernel

OFFERED_ON_612 = BackendFeature.IOTLB_MSG_V2 | BackendFeature.IOTLB_BATCH | BackendFeature.IOTLB_PERSIST


@pytest.mark.parametrize("mgmtdev, device_id, vqs", [("vdpasim_net", 1, 3), ("vdpasim_blk", 2, 1)])
def test_simulator_identity(sim_device, mgmtdev, device_id, vqs):
    dev = sim_device(mgmtdev)
    with VhostVdpa(dev.node) as fd:
        fd.set_owner()
        offered = fd.get_backend_features()
        assert OFFERED_ON_612 in offered
        assert fd.get_device_id() == device_id
        assert fd.get_vqs_count() == vqs
