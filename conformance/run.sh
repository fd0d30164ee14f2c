#!/usr/bin/env bash
# RFC 6455 conformance: run the Autobahn|Testsuite fuzzing client against an echo endpoint.
#
#   conformance/run.sh wsapp            # sections 1-7, 9, 10, 12, 13 against wsapp's /echo
#   conformance/run.sh node             # 1-7, 9, 10 against the Node `ws` reference echo server
#   conformance/run.sh wsapp '9.*'      # a subset (any wstest case patterns); table is printed only
#
# Installs its own tools when missing (Python 2.7 venv with wstest, the Node server's packages).
# A full run writes conformance/results-<target>.md and its report to conformance/reports/<target>/;
# a subset run only prints, and reports to conformance/reports/<target>-subset/.
#
# Environment knobs:
#   WSAPP_PYTHON        interpreter for server.py (default: .venv/bin/python, else python3)
#   CONFORMANCE_PIN=0   don't pin the server to CPU 0 and wstest to CPU 1 with taskset
#   CONFORMANCE_TIMEOUT seconds before the wstest run is abandoned (default 3600)
#   CONFORMANCE_PY27    a Python 2.7 interpreter to build the wstest venv from
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
TOOLS_VENV="$ROOT/.venv-tools"
AB_VENV="$ROOT/.venv-ab27"
NODE_DIR="$HERE/node"
WS_VERSION="8.23.0"
# 12 and 13 are permessage-deflate: wsapp negotiates it by default; the reference server runs with
# compression off (perMessageDeflate: false), so they are not run against it. 8 and 11 do not exist.
DEFAULT_CASES=("1.*" "2.*" "3.*" "4.*" "5.*" "6.*" "7.*" "9.*" "10.*")
DEFLATE_CASES=("12.*" "13.*")

log() { printf '[conformance] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

host_python3() {
    local candidate
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1; then
            command -v "$candidate"
            return
        fi
    done
    die "python3 not found"
}

find_python27() {
    if [[ -n "${CONFORMANCE_PY27:-}" ]]; then
        echo "$CONFORMANCE_PY27"
        return
    fi
    if command -v pyenv >/dev/null 2>&1; then
        local root
        root=$(pyenv root)
        if [[ ! -x "$root/versions/2.7.18/bin/python" ]]; then
            log "pyenv has no 2.7.18; trying 'pyenv install 2.7.18'"
            pyenv install -s 2.7.18 >&2 || die "could not install Python 2.7.18 with pyenv"
        fi
        echo "$root/versions/2.7.18/bin/python"
        return
    fi
    if command -v python2.7 >/dev/null 2>&1; then
        command -v python2.7
        return
    fi
    die "no Python 2.7 found (set CONFORMANCE_PY27 or install pyenv with 2.7.18)"
}

# The stamp records which pins the venv was built from, so a changed pin rebuilds it and an
# unchanged one costs nothing.
ensure_wstest() {
    local stamp="$AB_VENV/.conformance-pins" want
    want=$(cat "$HERE/requirements-tools.txt" "$HERE/requirements-py27.txt" | sha256sum | cut -d' ' -f1)
    if [[ -x "$AB_VENV/bin/wstest" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return
    fi
    log "installing the Autobahn|Testsuite into $AB_VENV"
    # Install chatter (index warnings, 2.7 deprecation banners) goes to a log shown only on failure.
    local install_log
    install_log=$(mktemp)
    {
        if [[ ! -x "$TOOLS_VENV/bin/virtualenv" ]]; then
            "$(host_python3)" -m venv "$TOOLS_VENV"
        fi
        "$TOOLS_VENV/bin/pip" install --disable-pip-version-check -r "$HERE/requirements-tools.txt" &&
            "$TOOLS_VENV/bin/virtualenv" --clear -p "$(find_python27)" "$AB_VENV" &&
            "$AB_VENV/bin/pip" install --disable-pip-version-check --no-python-version-warning \
                -r "$HERE/requirements-py27.txt" &&
            "$AB_VENV/bin/wstest" --autobahnversion
    } >"$install_log" 2>&1 || {
        cat "$install_log" >&2
        rm -f "$install_log"
        die "installing wstest failed"
    }
    rm -f "$install_log"
    echo "$want" >"$stamp"
}

ensure_node_server() {
    command -v node >/dev/null 2>&1 || die "node not found (needed for the node target)"
    local installed=""
    if [[ -f "$NODE_DIR/node_modules/ws/package.json" ]]; then
        installed=$(node -p "require('$NODE_DIR/node_modules/ws/package.json').version")
    fi
    if [[ "$installed" != "$WS_VERSION" ]]; then
        log "installing ws $WS_VERSION for the node echo server"
        (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error >&2)
    fi
}

free_port() {
    "$(host_python3)" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# CPU seconds (user + system) the server process has used so far; far less sensitive than wall
# time to whatever else the machine is running.
server_cpu_seconds() {
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / hz }' "/proc/$SERVER_PID/stat"
}

SERVER_PID=""
stop_server() {
    [[ -n "$SERVER_PID" ]] || return 0
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        # wsapp drains for WSAPP_DRAIN_SECONDS; give it that plus a margin before forcing.
        local waited=0
        while kill -0 "$SERVER_PID" 2>/dev/null && ((waited < 150)); do
            sleep 0.1
            waited=$((waited + 1))
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}
trap stop_server EXIT
trap 'exit 130' INT TERM

# Polls the port (bounded) because neither server offers a readiness signal other than listening.
wait_listening() {
    local port=$1 deadline=$((SECONDS + 30))
    while ((SECONDS < deadline)); do
        kill -0 "$SERVER_PID" 2>/dev/null || die "server exited during start-up; see $SERVER_LOG"
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    die "server did not listen on port $port within 30 s; see $SERVER_LOG"
}

json_array() {
    local first=1 item
    printf '['
    for item in "$@"; do
        ((first)) || printf ', '
        printf '"%s"' "$item"
        first=0
    done
    printf ']'
}

main() {
    [[ $# -ge 1 ]] || usage
    local target=$1
    shift
    local cases=("$@") full=0
    if [[ ${#cases[@]} -eq 0 ]]; then
        cases=("${DEFAULT_CASES[@]}")
        [[ "$target" == wsapp ]] && cases+=("${DEFLATE_CASES[@]}")
        full=1
    fi

    local pin_server=() pin_client=() pin_note="not pinned"
    if [[ "${CONFORMANCE_PIN:-1}" != "0" ]] && command -v taskset >/dev/null 2>&1 && (($(nproc) >= 2)); then
        pin_server=(taskset -c 0)
        pin_client=(taskset -c 1)
        pin_note="server on CPU 0, wstest on CPU 1"
    fi

    case "$target" in
        wsapp | node) ;;
        *) usage ;;
    esac
    ensure_wstest
    [[ "$target" == node ]] && ensure_node_server

    # A subset run gets its own folder so it never clobbers the last full report.
    local outdir="$HERE/reports/$target"
    ((full)) || outdir="$HERE/reports/$target-subset"
    mkdir -p "$outdir"
    # Old per-case files from a previous (larger) run would be misread as part of this one.
    rm -f "$outdir"/*.json "$outdir"/*.html
    SERVER_LOG="$outdir/server.log"

    local port url
    port=$(free_port)
    case "$target" in
        wsapp)
            local app_python="${WSAPP_PYTHON:-$ROOT/.venv/bin/python}"
            [[ -x "$app_python" ]] || app_python=$(host_python3)
            [[ -f "$ROOT/server.py" ]] || die "$ROOT/server.py not found"
            url="ws://127.0.0.1:$port/echo"
            # Limits lifted so the suite's 16 MiB and many-fragment messages reach the frame layer;
            # the rate limiter would otherwise throttle section 9's message storms.
            (cd "$ROOT" && exec env PORT="$port" HOST=127.0.0.1 \
                WSAPP_MAX_MESSAGE_BYTES=20000000 WSAPP_MAX_FRAGMENTS=0 WSAPP_RATE_LIMIT=0 \
                WSAPP_DRAIN_SECONDS="${WSAPP_DRAIN_SECONDS:-1}" \
                "${pin_server[@]}" "$app_python" server.py) >"$SERVER_LOG" 2>&1 &
            ;;
        node)
            url="ws://127.0.0.1:$port/"
            (cd "$NODE_DIR" && exec env PORT="$port" HOST=127.0.0.1 \
                "${pin_server[@]}" node echo_server.js) >"$SERVER_LOG" 2>&1 &
            ;;
    esac
    SERVER_PID=$!
    wait_listening "$port"
    log "$target listening at $url (pid $SERVER_PID; $pin_note)"

    local spec="$outdir/spec.json"
    cat >"$spec" <<EOF
{
  "outdir": "$outdir",
  "servers": [{"agent": "$target", "url": "$url"}],
  "cases": $(json_array "${cases[@]}"),
  "exclude-cases": [],
  "exclude-agent-cases": {}
}
EOF

    log "running wstest -m fuzzingclient (cases: ${cases[*]})"
    # Other work on the machine skews the timings; record how busy it was when the run began.
    local load
    load=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo "?")
    local cpu_before cpu_used="?"
    cpu_before=$(server_cpu_seconds)
    local started=$EPOCHREALTIME rc=0
    (cd "$outdir" && timeout "${CONFORMANCE_TIMEOUT:-3600}" \
        "${pin_client[@]}" "$AB_VENV/bin/wstest" -m fuzzingclient -s "$spec") >"$outdir/wstest.log" 2>&1 || rc=$?
    local elapsed
    elapsed=$(awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        cpu_used=$(awk -v a="$cpu_before" -v b="$(server_cpu_seconds)" 'BEGIN { printf "%.2f", b - a }')
    else
        log "warning: the $target server died during the run; see $SERVER_LOG"
    fi
    stop_server
    ((rc == 0)) || die "wstest exited $rc after ${elapsed}s; see $outdir/wstest.log"
    [[ -f "$outdir/index.json" ]] || die "no index.json in $outdir"

    local summary_args=("$outdir" "$target" --problems --breakdown 9
        --title "Autobahn|Testsuite against **$target** ($url), cases ${cases[*]}, wstest run ${elapsed} s wall, server CPU ${cpu_used} s, ${pin_note}, load average at start ${load}.")
    if ((full)); then
        summary_args+=(--markdown "$HERE/results-$target.md")
    fi
    "$(host_python3)" "$HERE/summarize.py" "${summary_args[@]}"
    log "wstest wall time ${elapsed}s, server CPU ${cpu_used}s; HTML report: $outdir/index.html"
    ((full)) && log "table written to conformance/results-$target.md"
    return 0
}

main "$@"
