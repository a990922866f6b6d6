#!/bin/sh
# The demo run by `make demo` inside the VM: vdpad attaches one vdpa_sim device
# of each kind (create over netlink, bind to vhost_vdpa, wait for the node),
# shows what netlink and each fd report, and detaches them again.
set -e
vdpad=${VDPAD:-vdpad}
modprobe -a vhost_vdpa vdpa_sim_net vdpa_sim_blk
"$vdpad" mgmtdev list
for spec in "demo-net vdpasim_net --mac 02:00:00:00:de:01 --mtu 9000" "demo-blk vdpasim_blk"; do
    set -- $spec
    name=$1 mgmtdev=$2
    shift 2
    node=$("$vdpad" attach "$name" --mgmtdev "$mgmtdev" "$@")
    echo
    echo "== $name ($mgmtdev) at $node"
    "$vdpad" dev show "$name"
    echo "-- config space (netlink)"
    "$vdpad" dev config "$name"
    echo "-- through $node"
    "$vdpad" info "$node"
done
echo
"$vdpad" dev list
for name in demo-net demo-blk; do
    "$vdpad" detach "$name"
done
echo "detached: $("$vdpad" dev list --json)"
