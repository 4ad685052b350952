#!/usr/bin/env bash
# deployhook under a real systemd: boots a Debian 12 container with systemd-nspawn, installs the
# binary and systemd/deployhook.service as docs/install.md says, and checks what the unit
# promises (issue 12 item 8):
#
#   start     `systemctl start` returns after READY=1: the API answers at once; the
#             ExecStartPre check is quiet; the Documentation= files are installed
#   reload    a valid config is taken, an invalid one rejected (journal -p err shows it);
#             the unit is `active` again after each
#   TasksMax  a build holds every task of the unit (a runtime TasksMax= drop-in); a reload
#             still ends (READY=1, unit active, "the old config stays in force" at -p err)
#             and a log request answers 503 instead of a dropped connection
#   stop      during a running build: the build gets SIGTERM, the unit stops cleanly
#   kill -9   systemd restarts the daemon; the build it ran is `interrupted`
#   priority  journalctl -p err shows the error lines ("cannot listen" too), not info lines
#
# Usage: tests/systemd/run.sh [BINARY]   (default target/release/deployhook if it is newer
# than target/debug/deployhook, else the debug one). Needs root with CAP_SYS_ADMIN and
# Debian's package mirror (mmdebstrap); skips with a message (exit 0) without them.
# The root file system is cached in /var/cache/deployhook-ci/ ($DEPLOYHOOK_CI_CACHE), keyed on
# its package list; set DEPLOYHOOK_CI_MIRROR to use another Debian mirror.
# Prints one summary line; exits non-zero when any check fails.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
SUITE=bookworm
MIRROR=${DEPLOYHOOK_CI_MIRROR:-http://deb.debian.org/debian}
PACKAGES=systemd,systemd-sysv,procps
CACHE=${DEPLOYHOOK_CI_CACHE:-/var/cache/deployhook-ci}
START=$(date +%s)

skip() { echo "systemd test: SKIP: $*"; exit 0; }

pick_binary() {
    local rel=$REPO/target/release/deployhook dbg=$REPO/target/debug/deployhook
    if [ -n "${1:-}" ]; then echo "$1"
    elif [ -x "$rel" ] && { [ ! -x "$dbg" ] || [ "$rel" -nt "$dbg" ]; }; then echo "$rel"
    else echo "$dbg"; fi
}
BIN=$(pick_binary "${1:-}")
[ -x "$BIN" ] || { echo "systemd test: FAIL: no binary at $BIN (cargo build first)"; exit 1; }

[ "$(id -u)" = 0 ] || skip "needs root"
# CAP_SYS_ADMIN is bit 21 of the effective set.
capeff=$(awk '/^CapEff/ {print $2}' /proc/self/status)
(( (16#$capeff >> 21) & 1 )) || skip "needs CAP_SYS_ADMIN"
if ! command -v mmdebstrap >/dev/null || ! command -v systemd-nspawn >/dev/null; then
    command -v apt-get >/dev/null || skip "mmdebstrap and systemd-nspawn are missing and there is no apt-get"
    echo "systemd test: installing mmdebstrap and systemd-container"
    apt-get install -y -qq mmdebstrap systemd-container >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null && apt-get install -y -qq mmdebstrap systemd-container >/dev/null; } ||
        skip "cannot install mmdebstrap and systemd-container"
fi

# One run at a time per host: without a host systemd, every nspawn --keep-unit container uses
# the same cgroup (payload/ under the caller's), and a second container would fight over it.
exec 9>/run/lock/deployhook-systemd-test.lock 2>/dev/null || exec 9>/tmp/deployhook-systemd-test.lock
flock 9

# --- the root file system, cached --------------------------------------------------------
key=$(printf '%s %s %s\n' "$SUITE" "$PACKAGES" minbase-nodoc | sha256sum | cut -c1-16)
tarball=$CACHE/rootfs-$SUITE-$key.tar
if [ ! -s "$tarball" ]; then
    mkdir -p "$CACHE"
    echo "systemd test: building the $SUITE root file system (cached in $tarball)"
    # No documentation, manuals or translations: a smaller download and archive.
    mmdebstrap --quiet --variant=minbase --format=tar --include="$PACKAGES" \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        "$SUITE" "$tarball.part" "$MIRROR" ||
        { rm -f "$tarball.part"; echo "systemd test: FAIL: mmdebstrap failed"; exit 1; }
    mv "$tarball.part" "$tarball"
fi
# In memory where there is room: unpacking and removing the tree is then quick.
tmpbase=/var/tmp
[ "$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}')" -gt 2000000 ] 2>/dev/null && tmpbase=/dev/shm
work=$(mktemp -d "$tmpbase/deployhook-systemd.XXXXXX")
root=$work/root
mkdir "$root"
tar -C "$root" -xf "$tarball"

# --- what docs/install.md copies from the checkout ----------------------------------------
mkdir -p "$root/src/docs" "$root/src/systemd"
cp "$BIN" "$root/src/deployhook"
cp "$REPO/systemd/deployhook.service" "$root/src/systemd/"
cp "$REPO/README.md" "$root/src/"
cp "$REPO/docs/install.md" "$root/src/docs/"

# --- boot ---------------------------------------------------------------------------------
nspawn_pid=
leader=
cleanup() {
    local rc=$?
    set +e # Clean up whatever fails on the way.
    if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
        if [ -n "$leader" ]; then ct "systemctl poweroff" >/dev/null 2>&1; fi
        for _ in $(seq 100); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.2; done
        echo "systemd test: container down after $(($(date +%s) - START))s"
        # Not down (a boot that never finished): the container's init first, then nspawn, or
        # the container would live on without it.
        if [ -n "$leader" ]; then kill -9 "$leader" 2>/dev/null || true; fi
        kill -9 "$nspawn_pid" 2>/dev/null || true
        wait "$nspawn_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
    echo "systemd test: done after $(($(date +%s) - START))s"
    exit $rc
}
trap cleanup EXIT

# --register=no: the host may have no systemd (no machined); --keep-unit: stay in our cgroup;
# --private-network: the daemon inside listens on 127.0.0.1:8787 of its own, not the host's.
systemd-nspawn --quiet -D "$root" --register=no --keep-unit --private-network -b --console=pipe \
    >"$work/console.log" 2>&1 </dev/null &
nspawn_pid=$!
leader=
for _ in $(seq 100); do
    leader=$(cat /proc/$nspawn_pid/task/*/children 2>/dev/null | awk '{print $1}' | head -1)
    [ -n "$leader" ] && break
    sleep 0.1
done
[ -n "$leader" ] || { echo "systemd test: FAIL: the container did not start"; cat "$work/console.log"; exit 1; }

# Runs a shell command inside the container (as root, outside any unit).
ct() {
    nsenter -t "$leader" -m -u -i -n -p -C -- \
        env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        /bin/sh -c "$1"
}

boot_deadline=$(($(date +%s) + 120))
while [ "$(date +%s)" -lt "$boot_deadline" ]; do
    state=$(ct "systemctl is-system-running" 2>/dev/null || true)
    case $state in running | degraded) break ;; esac
    sleep 0.2
done
case $state in
    running | degraded) ;;
    *) echo "systemd test: FAIL: the container's systemd is '$state' after 120s"; tail -30 "$work/console.log"; exit 1 ;;
esac

# Where the pids and memory controllers are cgroup v1 only, nspawn mounts them read-only and
# systemd silently ignores TasksMax=/MemoryMax=: make them writable, re-execute systemd.
if ct "grep -q ' /sys/fs/cgroup/pids cgroup ro' /proc/mounts"; then
    ct "mount -o remount,bind,rw /sys/fs/cgroup/pids && mount -o remount,bind,rw /sys/fs/cgroup/memory && systemctl daemon-reexec"
fi

# --- checks -------------------------------------------------------------------------------
passed=0
failed=()
check() { # check NAME COMMAND...: runs COMMAND on the host side, records the result
    local name=$1; shift
    if "$@"; then passed=$((passed + 1)); echo "  ok    $name ($(($(date +%s) - START))s)"
    else failed+=("$name"); echo "  FAIL  $name ($(($(date +%s) - START))s)"; fi
}
dh() { ct "deployhook $*"; }
wait_for() { # wait_for SECONDS SHELL-CONDITION (in the container)
    local n=$(($1 * 5))
    for _ in $(seq "$n"); do ct "$2" >/dev/null 2>&1 && return 0; sleep 0.2; done
    return 1
}
journal_err() { ct "journalctl -q -u deployhook -p err --no-pager -o cat"; }
# journald takes a moment to file a line: a line that must be there is waited for.
err_has() {
    for _ in $(seq 50); do journal_err | grep -q -- "$1" && return 0; sleep 0.2; done
    return 1
}
err_lacks() { ! journal_err | grep -q -- "$1"; }
# The unit leaves `reloading` only with READY=1 (systemd 252's reload job may end before).
reload_ends_active() { ct "timeout 30 systemctl reload deployhook" && wait_for 30 "systemctl is-active --quiet deployhook"; }

# Install, as docs/install.md sections 1–4 say.
ct '
set -e
cd /src
install -m 0755 deployhook /usr/local/bin/deployhook
useradd --system --user-group --home-dir /var/lib/deployhook --no-create-home --shell /usr/sbin/nologin deployhook
install -d -m 0750 -o deployhook -g deployhook /var/lib/deployhook
install -d -m 0755 /etc/deployhook
install -d -m 0755 -o deployhook -g deployhook /srv/www/site
cat > /etc/deployhook/deploy.toml <<EOF
[server]
listen = "127.0.0.1:8787"
state_dir = "/var/lib/deployhook"
shutdown_timeout = "2s"
kill_grace = "2s"
builds_per_minute = 1000

[api]
token_file = "/var/lib/deployhook/admin.token"

[projects.site]
branches = ["main", "stop", "kill", "fill"]
workdir = "/srv/www/site"
project_builds_per_minute = 1000
command = "trap \"echo TERM > /var/lib/deployhook/got-term-\$DEPLOYHOOK_BRANCH; exit 0\" TERM; echo started; sleep 300 & wait"

[projects.bomb]
branches = ["main"]
workdir = "/srv/www/site"
command = "echo filling; for i in \$(seq 30); do sleep 300 & done; echo full; wait"
EOF
chown root:deployhook /etc/deployhook/deploy.toml
chmod 0640 /etc/deployhook/deploy.toml
deployhook check --config /etc/deployhook/deploy.toml >/dev/null
install -m 0644 systemd/deployhook.service /etc/systemd/system/deployhook.service
install -D -m 0644 -t /usr/share/doc/deployhook README.md docs/install.md
systemctl daemon-reload
'

echo "systemd test: $(ct 'systemctl --version | head -1') in a container, binary $BIN"

# start: `systemctl start` returns after READY=1, so the API answers at once.
check "start returns once ready, the API answers at once" \
    ct "systemctl enable --now deployhook >/dev/null 2>&1 && systemctl is-active --quiet deployhook && deployhook builds list >/dev/null"
check "status text says it listens" \
    ct "systemctl show -p StatusText --value deployhook | grep -q 'listening on 127.0.0.1:8787'"
check "ExecStartPre check --quiet writes nothing to the journal" \
    ct "! journalctl -q -u deployhook --no-pager -o cat | grep -q 'config OK'"
check "Documentation= files are installed" \
    ct 'for u in $(systemctl show -p Documentation --value deployhook); do test -f "${u#file://}" || exit 1; done'

# reload: valid, then invalid; READY=1 after each (the unit leaves `reloading`).
check "a valid reload is taken" reload_ends_active
check "the journal says so" \
    wait_for 10 "journalctl -q -u deployhook --no-pager -o cat | grep -q 'config reloaded'"
ct "cp /etc/deployhook/deploy.toml /root/good.toml && echo 'bogus = 1' >> /etc/deployhook/deploy.toml"
check "an invalid reload is rejected, the unit stays active" reload_ends_active
check "journal -p err shows the rejected reload" \
    err_has 'config reload rejected, the old config stays in force: /etc/deployhook/deploy.toml'
check "journal -p err holds no info lines" err_lacks 'listening on'
ct "cp /root/good.toml /etc/deployhook/deploy.toml && systemctl reload deployhook"

# TasksMax: a build holds 30 tasks, then a runtime drop-in lowers TasksMax= to what the
# unit holds, so not one more thread can start; a reload still ends, a log request gets 503.
tasks=$(ct "systemctl show -p TasksCurrent --value deployhook")
bomb=$(dh trigger bomb)
wait_for 30 "deployhook builds logs $bomb | grep -q full" || true
# tokio's blocking pool (which the daemon once used for this) keeps an idle thread for 10 s,
# and the bug showed only without one: give any such thread time to go.
sleep 11
limit=$(ct "systemctl show -p TasksCurrent --value deployhook")
ct "systemctl set-property --runtime deployhook TasksMax=$limit"
check "the build holds the unit at TasksMax=$limit (30 tasks more than the daemon's $tasks)" \
    ct "[ \$(systemctl show -p TasksMax --value deployhook) = $limit ] && [ $limit -ge $((tasks + 30)) ]"
check "a reload at TasksMax ends: READY=1, unit active" reload_ends_active
check "journal -p err: reload rejected for want of a thread" \
    err_has 'config reload rejected, the old config stays in force: cannot start a thread'
check "a log request at TasksMax answers 503, not a dropped connection" \
    ct "out=\$(deployhook builds logs $bomb 2>&1); [ \$? -ne 0 ] && echo \"\$out\" | grep -q 'cannot start a thread'"
dh builds cancel "$bomb" >/dev/null || true
check "after the build, the unit has room again" \
    wait_for 30 "[ \$(systemctl show -p TasksCurrent --value deployhook) -lt $((tasks + 10)) ]"
ct "systemctl set-property --runtime deployhook TasksMax=2048"
check "with room, the log reads" ct "deployhook builds logs $bomb | grep -q filling"
check "with room, a reload is taken" reload_ends_active

# stop during a running build: the build gets SIGTERM, the unit stops cleanly.
stop=$(dh trigger site --branch stop)
wait_for 30 "deployhook builds logs $stop | grep -q started" || true
check "stop during a build is clean" \
    ct "timeout 60 systemctl stop deployhook && [ \"\$(systemctl show -p Result --value deployhook)\" = success ] && ! systemctl is-failed --quiet deployhook"
check "the build got SIGTERM" ct "grep -q TERM /var/lib/deployhook/got-term-stop"

# kill -9: systemd restarts the daemon; the build it ran is interrupted.
ct "systemctl start deployhook"
check "it starts again after the stop" ct "systemctl is-active --quiet deployhook"
killed=$(dh trigger site --branch kill)
wait_for 30 "deployhook builds logs $killed | grep -q started" || true
old_pid=$(ct "systemctl show -p MainPID --value deployhook")
ct "kill -9 $old_pid"
check "systemd restarts the daemon after kill -9" \
    wait_for 60 "systemctl is-active --quiet deployhook && [ \$(systemctl show -p MainPID --value deployhook) != $old_pid ] && deployhook builds list >/dev/null"
check "the build of the killed daemon is interrupted" \
    ct "deployhook builds show $killed --json | grep -q '\"build_outcome\": *\"interrupted\"'"

# priorities: "cannot listen" (port taken) is an error line, said once.
# The port's other user: a second daemon on another state dir, outside the unit.
ct "systemctl stop deployhook; sed 's#/var/lib/deployhook#/root/other#' /etc/deployhook/deploy.toml > /root/other.toml; mkdir -p /root/other"
ct "deployhook serve --config /root/other.toml > /root/other.log 2>&1 & echo \$! > /root/other.pid"
wait_for 30 "grep -q 'listening on' /root/other.log" || echo "  (the port's other user did not start)"
# journalctl --since has whole seconds: start in a second of its own.
since=$(($(ct "date +%s") + 1))
while [ "$(ct "date +%s")" -lt "$since" ]; do sleep 0.1; done
ct "systemctl start deployhook" >/dev/null 2>&1 || true
# Every failed start (Restart= retries too) says it once, at priority err.
cannot_listen_once_per_start_at_err() {
    local all errs starts
    sleep 1
    wait_for 10 "journalctl -q -u deployhook --since @$since --no-pager -o cat -p err | grep -q 'cannot listen'" || true
    all=$(ct "journalctl -q -u deployhook --since @$since --no-pager -o cat -p debug")
    errs=$(ct "journalctl -q -u deployhook --since @$since --no-pager -o cat -p err" | grep -c 'cannot listen' || true)
    starts=$(echo "$all" | grep -c '^Starting deployhook' || true)
    [ "$errs" -ge 1 ] && [ "$errs" = "$(echo "$all" | grep -c 'cannot listen')" ] && [ "$errs" = "$starts" ] ||
        { echo "    'cannot listen' at err: $errs, in all: $(echo "$all" | grep -c 'cannot listen'), starts: $starts"; return 1; }
}
check "journal -p err shows 'cannot listen', once per failed start" cannot_listen_once_per_start_at_err
ct "kill \$(cat /root/other.pid); while kill -0 \$(cat /root/other.pid) 2>/dev/null; do sleep 0.1; done; systemctl reset-failed deployhook; systemctl restart deployhook"
check "it starts once the port is free" ct "systemctl is-active --quiet deployhook"

secs=$(($(date +%s) - START))
if [ ${#failed[@]} -eq 0 ]; then
    echo "systemd test: PASS: $passed checks in ${secs}s"
else
    echo "systemd test: FAIL: ${#failed[@]} of $((passed + ${#failed[@]})) checks failed in ${secs}s: ${failed[*]}"
    echo "--- journal of deployhook ---"
    ct "journalctl -q -u deployhook --no-pager -o short-precise | tail -60" || true
    exit 1
fi
