#!/bin/sh
# The demo run by `make demo` inside the VM: `vdpad serve` owns the devices; a
# client that never opens a device node attaches vdpasim_net through it, opens
# a session, maps its memory, moves frames, resets with persistent maps, moves
# frames again and shows the daemon's view (tests/vm/guest/demo_client.py).
set -e
vdpad=${VDPAD:-vdpad}
python=${PYTHON:-python3}
modprobe -a vhost_vdpa vdpa_sim_net
"$vdpad" serve &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null; wait $daemon' EXIT
i=0
until "$vdpad" status >/dev/null 2>&1; do
    i=$((i + 1))
    [ $i -lt 300 ] || { echo "the daemon did not answer" >&2; exit 1; }
    sleep 0.1
done
echo "== vdpad serve is up (pid $daemon)"
echo "\$ vdpad attach demo-net --mgmtdev vdpasim_net --mac 02:00:00:00:de:01"
"$vdpad" attach demo-net --mgmtdev vdpasim_net --mac 02:00:00:00:de:01
"$python" -m tests.vm.guest.demo_client "$vdpad" demo-net
echo
echo "\$ vdpad detach demo-net"
"$vdpad" detach demo-net
kill -TERM $daemon
wait $daemon
trap - EXIT
echo "the daemon stopped (exit 0)"
