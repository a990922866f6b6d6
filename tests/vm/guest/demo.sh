#!/bin/sh
# The demo run by `make demo` inside the VM: make one vdpa_sim device of each
# kind, bind it to vhost_vdpa, and show what vdpad sees through its fd.
set -e
vdpad=${VDPAD:-vdpad}
modprobe -a vhost_vdpa vdpa_sim_net vdpa_sim_blk
for spec in "demo-net vdpasim_net" "demo-blk vdpasim_blk"; do
    set -- $spec
    vdpa dev add name "$1" mgmtdev "$2"
    d=/sys/bus/vdpa/devices/$1
    if [ "$(basename "$(readlink -f "$d/driver")")" != vhost_vdpa ]; then
        [ -e "$d/driver" ] && echo "$1" >"$d/driver/unbind"
        echo vhost_vdpa >"$d/driver_override"
        echo "$1" >/sys/bus/vdpa/drivers/vhost_vdpa/bind
    fi
    node=/dev/$(ls "$d" | grep vhost-vdpa-)
    while [ ! -c "$node" ]; do sleep 0.05; done
    echo "== $1 ($2) at $node"
    "$vdpad" info "$node"
done
