#!/bin/bash
# A durable single-node Ceph (monitor + BlueStore-on-file OSD + radosgw) on 127.0.0.1, cephx off, no mgr:
# the local S3 server of bucketlens. Adapted from ../shared/reference/ceph-local.sh; the reason behind
# each setting is in DESIGN.md ("Local S3 server"). Driven by infra/stack.py.
# usage: ceph.sh init|start|stop|kill|stop-rgw|start-rgw|pids DIR [S3_PORT] [MON_PORT]   (DIR absolute)
#   init  : fresh cluster in DIR (must not exist), start it, create S3 user (cold start)
#   start : start mon, osd, rgw from existing DIR (warm restart)
#   stop  : SIGTERM rgw, osd, mon (by pid file, in that order) and wait for each to exit
#   kill  : SIGKILL all three by pid
set -euo pipefail
CMD=${1:?cmd}; C=${2:?absolute state dir}; PORT=${3:-7480}; MON_PORT=${4:-3300}
CONF=$C/ceph.conf

wait_s3() {  # wait until rgw answers HTTP on $PORT, for 2 minutes at most (each try 2 s at most: a frozen radosgw
  # held a try without a limit, and the supervisor with it: review 25)
  local deadline=$((SECONDS + 120))
  while [ $SECONDS -lt $deadline ]; do
    curl -s -o /dev/null -m 2 http://127.0.0.1:$PORT/ && return 0; sleep 0.2
  done
  echo "rgw did not come up" >&2; return 1
}
pid_of() {  # pid from pid file, only if that process is really the expected daemon, and alive: a SIGKILLed one
  # stays a zombie until its parent reaps it (here that took minutes), and counting it as running left a crashed
  # radosgw down: `start` skipped it, then waited for an S3 that never came
  local p; p=$(cat $C/run/$1.pid 2>/dev/null || true); [ -n "$p" ] || return 0
  case $1 in mon.*) n=ceph-mon;; osd.*) n=ceph-osd;; *) n=radosgw;; esac
  [ "$(cat /proc/$p/comm 2>/dev/null)" = "$n" ] || return 0
  grep -q '^State:[[:space:]]*Z' /proc/$p/status 2>/dev/null || echo $p
}
wait_osd_active() {  # OSD admin socket reports state=active (booted into the current osdmap)
  local p deadline=$((SECONDS + 120)); p=$(pid_of osd.0)
  while [ $SECONDS -lt $deadline ]; do
    timeout 5 ceph --admin-daemon $C/run/osd.0.$p.asok status 2>/dev/null | grep -q '"state": "active"' && return 0
    sleep 0.2
  done; echo "osd not active" >&2; return 1
}
break_notif_locks() {  # drop the previous radosgw's ownership locks on persistent-topic queues
  # (otherwise the new radosgw waits ~90 s for them to expire before delivering queued notifications)
  local R="timeout 20 rados -c $CONF -p default.rgw.log -N notif"  # (with the OSD hung they can wait for good: review 24)
  $R ls 2>/dev/null | grep -v '^queues_list_object$' | while read -r q; do
    $R lock info "$q" "${q}_lock" 2>/dev/null | python3 -c '
import json,sys
try: d=json.load(sys.stdin)
except Exception: sys.exit()
for l in d.get("lockers",[]): print(l["name"], l["cookie"])' | while read -r who cookie; do
      $R lock break "$q" "${q}_lock" "$who" --lock-cookie "$cookie" && echo "broke notif lock on $q ($who)"
    done
  done || true
}
start_rgw() {  # radosgw's HTTP server on $PORT. tcp_nodelay: without it each GET on a kept-alive connection waited
  # ~40 ms for the client's delayed ACK before the body went out (300 GETs of 60 KB one after another: 44 ms each,
  # 2.2 ms with it). Ceph 16 (Debian 12's) runs civetweb: its beast aborts radosgw on every multi-object delete
  # (DeleteObjects: `aws s3 rm --recursive`, rclone, mc) in a bucket with a persistent notification topic
  # (rgw::notify::publish_reserve in the coroutine RGWDeleteMultiObj spawns per object); civetweb deletes them in
  # turn. Later releases have no civetweb and run beast.
  local frontend="beast endpoint=127.0.0.1:$PORT tcp_nodelay=1" quiet=()
  if radosgw --version 2>/dev/null | grep -q '^ceph version 16\.'; then
    frontend="civetweb port=127.0.0.1:$PORT tcp_nodelay=1"; quiet=(--debug-civetweb 0/0)  # (no access log line)
  fi
  radosgw -c $CONF -n client.rgw.a --rgw-frontends "$frontend" "${quiet[@]}" 9>&-
}
drop_dead_sockets() {  # the admin sockets of daemons that were killed (each is named by its pid)
  local s p; for s in $C/run/*.asok; do p=${s%.asok}; p=${p##*.}; [ -e "$s" ] && [ ! -e /proc/$p ] && rm -f "$s"; done; true
}
start_daemons() {  # starts only what is not running (radosgw alone may be down, e.g. during a watchdog restart)
  drop_dead_sockets
  [ -n "$(pid_of mon.a)" ] || ceph-mon -c $CONF -i a 9>&-   # (9: the lock below, not for the daemons to hold)
  [ -n "$(pid_of osd.0)" ] || ceph-osd -c $CONF -i 0 9>&-   # returns after the store is mounted (~3 s)
  wait_osd_active   # after a SIGKILL the osdmap still has the old osd address: rgw started earlier stalls ~10 s
  [ -n "$(pid_of client.rgw.a)" ] && return 0
  [ "${NOTIF_LOCK_BREAK:-1}" = 1 ] && break_notif_locks
  start_rgw
}

case $CMD in start|stop|stop-rgw|start-rgw)  # one at a time per cluster: `up` and the supervisor both started an OSD
  # that had died at once, and the second failed on the first's lock on its pid file
  exec 9>"$C/run/ceph.sh.lock"; flock -w 600 9 || { echo "another ceph.sh held $C/run/ceph.sh.lock for 600 s" >&2; exit 1; }
esac
case $CMD in
init)
  [ -e $C/ceph.conf ] && { echo "$C exists" >&2; exit 1; }
  mkdir -p $C/run $C/log $C/mon.a $C/osd.0 $C/rgw.a; cd $C
  FSID=$(python3 -c 'import uuid;print(uuid.uuid4())')
  cat > ceph.conf <<EOF
[global]
fsid = $FSID
mon host = v2:127.0.0.1:$MON_PORT
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc
ms client mode = crc
ms mon service mode = crc
ms mon cluster mode = crc
ms service mode = crc
ms cluster mode = crc
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail warn = 5
mon max pg per osd = 1000
run dir = $C/run
admin socket = $C/run/\$name.\$pid.asok
log file = $C/log/\$name.log
pid file = $C/run/\$name.pid
keyring = $C/keyring
[mon.a]
mon data = $C/mon.a
[osd]
osd data = $C/osd.\$id
osd objectstore = bluestore
bluestore block path = $C/osd.\$id/block.img
bluestore block create = true
bluestore block size = 10737418240
bluestore cache autotune = false
bluestore cache size = 134217728
osd memory target = 939524096
# RADOS names are <bucket marker>_<key>: 460 (an ext4-era limit) made keys over ~415 bytes fail with a 500;
# 2048 (Ceph's default, fine on BlueStore) lets S3 keys reach their own 1024-byte limit
osd max object name len = 2048
osd max object namespace len = 64
[client.rgw.a]
# rgw frontends: given on radosgw's command line by start_rgw (frontend), which depends on the Ceph release
rgw data = $C/rgw.a
rgw curl low speed time = 5
EOF
  ceph-authtool --create-keyring keyring --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool keyring --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
  monmaptool --create --fsid $FSID --addv a "[v2:127.0.0.1:$MON_PORT]" monmap >/dev/null
  ceph-mon -c ceph.conf --mkfs -i a --monmap monmap --keyring keyring
  ceph-mon -c ceph.conf -i a
  OSDUUID=$(python3 -c 'import uuid;print(uuid.uuid4())')
  ID=$(timeout 30 ceph -c ceph.conf osd new $OSDUUID 2>/dev/null)
  ceph-osd -c ceph.conf -i $ID --mkfs --osd-uuid $OSDUUID > log/osd-mkfs.out 2>&1
  ceph-osd -c ceph.conf -i $ID
  timeout 30 ceph -c ceph.conf osd set noout >/dev/null 2>&1 || true
  start_rgw
  wait_s3
  radosgw-admin -c ceph.conf user create --uid=test --display-name=test --access-key=${S3_ACCESS_KEY:-rgwkey} --secret-key=${S3_SECRET_KEY:-rgwsecret} >/dev/null 2>&1
  ;;
start) cd $C; start_daemons; wait_s3 ;;
stop)
  for d in client.rgw.a osd.0 mon.a; do
    p=$(pid_of $d); [ -n "$p" ] || continue
    kill -TERM $p 2>/dev/null || true; kill -CONT $p 2>/dev/null || true  # (a frozen one takes its TERM)
    for i in $(seq 1 300); do kill -0 $p 2>/dev/null || break; sleep 0.1; done
    if kill -0 $p 2>/dev/null; then  # (it stayed running after `down` said down)
      echo "$d ($p) still alive after 30s: killed" >&2; kill -KILL $p 2>/dev/null || true
    fi
  done ;;
kill)
  for d in client.rgw.a osd.0 mon.a; do p=$(pid_of $d); [ -n "$p" ] && kill -KILL $p 2>/dev/null || true; done
  sleep 0.5 ;;
stop-rgw)  # the S3 endpoint goes away, the cluster stays (fault tests, the delivery watchdog). One that outlives
  # its TERM by 30 s is killed: left running, `start-rgw` took it for up and started none, while it no longer served
  p=$(pid_of client.rgw.a); [ -n "$p" ] || exit 0
  kill -TERM $p 2>/dev/null || true; kill -CONT $p 2>/dev/null || true
  for i in $(seq 1 300); do [ -z "$(pid_of client.rgw.a)" ] && break; sleep 0.1; done  # (a zombie is gone)
  if [ -n "$(pid_of client.rgw.a)" ]; then
    echo "client.rgw.a ($p) still alive 30 s after SIGTERM: killed" >&2; kill -KILL $p 2>/dev/null || true
    for i in $(seq 1 100); do [ -z "$(pid_of client.rgw.a)" ] && break; sleep 0.1; done
  fi ;;
start-rgw) cd $C; [ -n "$(pid_of client.rgw.a)" ] || { break_notif_locks; start_rgw; }; wait_s3 ;;
pids) for d in mon.a osd.0 client.rgw.a; do echo -n "$d=$(pid_of $d) "; done; echo ;;
*) echo "bad cmd" >&2; exit 2 ;;
esac
