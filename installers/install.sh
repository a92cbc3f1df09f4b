#!/bin/sh
# Nebula Command agent installer for Linux (x86_64, aarch64).
#
#   curl -fsSL https://CONTROLLER/install.sh | sudo sh -s -- --token TOKEN
#
# Downloads nebula-agent from the controller, checks its SHA-256 and its Ed25519 signature, installs
# it to /usr/local/bin, writes /etc/nebula-agent/agent.toml and a systemd unit, joins the fleet with
# the token and starts the agent. Running it again upgrades the binary in place and keeps the node's
# identity (no token needed). `--uninstall` removes everything it installed.
#
# Options:
#   --token TOKEN        join token from the dashboard or `nebula token create`
#   --url URL            controller's HTTP address (downloads)
#   --controller H:P     controller's QUIC address (agents dial it)
#   --name NAME          node name (default: the hostname)
#   --label KEY=VALUE    label to ask for (repeatable)
#   --auto-update        let the agent update itself when the controller serves a newer build
#   --uninstall          stop the agent and remove everything this script installed
set -eu

# @nebula-defaults-begin (the controller fills this block in when it serves the script)
DEFAULT_URL=''
DEFAULT_CONTROLLER=''
# Every controller replica's QUIC address (space-separated), tried in turn by the agent.
DEFAULT_REPLICAS=''
CA_PIN=''
# The fleet CA (PEM) when the controller's HTTPS certificate comes from it: downloads trust it.
CA_PEM=''
RELEASE_KEY_HEX=''
RELEASE_KEY_PEM=''
# The SHA-256 the controller computed for each binary when it served this script.
expected_sha256() { :; }
# @nebula-defaults-end

BIN=/usr/local/bin/nebula-agent
CONF_DIR=/etc/nebula-agent
CONF=$CONF_DIR/agent.toml
STATE_DIR=/var/lib/nebula-agent
UNIT=/etc/systemd/system/nebula-agent.service
LOG=/var/log/nebula-agent.log
PIDFILE=/run/nebula-agent.pid

say() { printf 'nebula-agent: %s\n' "$*"; }
die() { printf 'nebula-agent: error: %s\n' "$*" >&2; exit 1; }

usage() {
    cat <<'USAGE'
usage: install.sh --token TOKEN [--url URL] [--controller HOST:PORT] [--name NAME]
                  [--label KEY=VALUE]... [--auto-update]
       install.sh                 (again: upgrade in place, keeping the node's identity)
       install.sh --uninstall     (remove everything this script installed)
USAGE
}

TOKEN=''
URL=$DEFAULT_URL
CONTROLLER=$DEFAULT_CONTROLLER
NAME=''
LABELS=''
AUTO_UPDATE=false
UNINSTALL=false

while [ $# -gt 0 ]; do
    case "$1" in
        --token) [ $# -ge 2 ] || die "--token needs a value"; TOKEN=$2; shift 2 ;;
        --url) [ $# -ge 2 ] || die "--url needs a value"; URL=$2; shift 2 ;;
        --controller) [ $# -ge 2 ] || die "--controller needs a value"; CONTROLLER=$2; shift 2 ;;
        --name) [ $# -ge 2 ] || die "--name needs a value"; NAME=$2; shift 2 ;;
        --label)
            [ $# -ge 2 ] || die "--label needs KEY=VALUE"
            case "$2" in *=*) ;; *) die "--label needs KEY=VALUE, got '$2'" ;; esac
            LABELS="$LABELS $2"; shift 2 ;;
        --auto-update) AUTO_UPDATE=true; shift ;;
        --uninstall) UNINSTALL=true; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done

[ "$(id -u)" -eq 0 ] || die "run as root (sudo sh -s -- ...)"

has_systemd() { [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; }

# Stop a running agent, whichever way it was started.
stop_agent() {
    if has_systemd && [ -f "$UNIT" ]; then
        systemctl stop nebula-agent.service 2>/dev/null || true
    fi
    if [ -f "$PIDFILE" ]; then
        pid=$(cat "$PIDFILE" 2>/dev/null || true)
        case "$pid" in
            ''|*[!0-9]*) ;;
            *)
                if kill "$pid" 2>/dev/null; then
                    i=0
                    while kill -0 "$pid" 2>/dev/null && [ $i -lt 10 ]; do sleep 1; i=$((i + 1)); done
                    kill -9 "$pid" 2>/dev/null || true
                fi
                ;;
        esac
        rm -f "$PIDFILE"
    fi
}

if [ "$UNINSTALL" = true ]; then
    stop_agent
    if has_systemd && [ -f "$UNIT" ]; then
        systemctl disable nebula-agent.service 2>/dev/null || true
    fi
    rm -f "$UNIT" "$BIN" "$BIN.prev" "$BIN.new" "$LOG" "$PIDFILE"
    rm -rf "$CONF_DIR" "$STATE_DIR"
    if has_systemd; then systemctl daemon-reload 2>/dev/null || true; fi
    say "removed the agent, its configuration, identity, unit and log"
    exit 0
fi

# ---- platform ----
[ "$(uname -s)" = Linux ] || die "this installer is for Linux; on Windows use install.ps1"
case "$(uname -m)" in
    x86_64|amd64) ARCH=x86_64 ;;
    aarch64|arm64) ARCH=aarch64 ;;
    *) die "unsupported CPU architecture $(uname -m) (x86_64 and aarch64 are served)" ;;
esac
FILE=nebula-agent-linux-$ARCH

[ -n "$URL" ] || die "no controller URL: pass --url https://CONTROLLER"
URL=${URL%/}

# Downloads trust the fleet CA (written to $TMP/ca.pem below) when the controller serves one.
fetch() {
    if command -v curl >/dev/null 2>&1; then
        if [ -n "$CA_PEM" ]; then
            curl -fsSL --retry 3 --cacert "$TMP/ca.pem" -o "$2" "$1"
        else
            curl -fsSL --retry 3 -o "$2" "$1"
        fi
    elif command -v wget >/dev/null 2>&1; then
        if [ -n "$CA_PEM" ]; then
            wget -q --ca-certificate="$TMP/ca.pem" -O "$2" "$1"
        else
            wget -q -O "$2" "$1"
        fi
    else
        die "neither curl nor wget is installed"
    fi
}

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    elif command -v openssl >/dev/null 2>&1; then
        openssl dgst -sha256 -r "$1" | cut -d' ' -f1
    else
        die "neither sha256sum nor openssl is installed: cannot check the download"
    fi
}

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT INT TERM

# A join token names its controller's CA: the script must be that controller's.
if [ -n "$TOKEN" ] && [ -n "$CA_PIN" ]; then
    case "$TOKEN" in
        *"@$CA_PIN") ;;
        *) die "this join token is for another controller (its CA pin differs from $URL's)" ;;
    esac
fi
if [ -n "$CA_PEM" ]; then
    printf '%s\n' "$CA_PEM" > "$TMP/ca.pem"
    # The CA the downloads trust must be the one that pin names.
    if command -v openssl >/dev/null 2>&1; then
        openssl x509 -in "$TMP/ca.pem" -outform der -out "$TMP/ca.der" || die "the fleet CA in this script is not a certificate"
        [ "$(sha256_of "$TMP/ca.der")" = "$CA_PIN" ] || die "the fleet CA in this script is not the one its pin names; refusing to install"
    else
        say "openssl is not installed: the fleet CA was not checked against the pin"
    fi
fi

# ---- download and check ----
say "downloading $FILE from $URL"
fetch "$URL/downloads/$FILE" "$TMP/agent" || die "downloading $URL/downloads/$FILE failed"
fetch "$URL/downloads/$FILE.sha256" "$TMP/sha256" || die "downloading the checksum failed"
fetch "$URL/downloads/$FILE.manifest" "$TMP/manifest" || die "downloading the release manifest failed"
fetch "$URL/downloads/$FILE.sig" "$TMP/sig" || die "downloading the signature failed"

actual=$(sha256_of "$TMP/agent")
published=$(cut -d' ' -f1 "$TMP/sha256")
pinned=$(expected_sha256 "$FILE")
if [ "$actual" != "$published" ]; then
    die "checksum mismatch: the download is $actual, the controller publishes $published; refusing to install"
fi
if [ -n "$pinned" ] && [ "$actual" != "$pinned" ]; then
    die "checksum mismatch: the download is $actual, this script expects $pinned; refusing to install"
fi
# The manifest names version, platform and digest; the signature covers exactly that line.
read -r m_name m_version m_platform m_digest < "$TMP/manifest" || die "the release manifest is empty"
if [ "$m_name" != nebula-agent ] || [ "$m_platform" != "linux-$ARCH" ] || [ "$m_digest" != "sha256:$actual" ]; then
    die "the release manifest does not describe this download; refusing to install"
fi
if [ -n "$RELEASE_KEY_PEM" ]; then
    if command -v openssl >/dev/null 2>&1; then
        printf '%s\n' "$RELEASE_KEY_PEM" > "$TMP/key.pem"
        if ! openssl pkeyutl -verify -pubin -inkey "$TMP/key.pem" -rawin \
            -in "$TMP/manifest" -sigfile "$TMP/sig" >/dev/null 2>&1; then
            die "bad signature: $FILE $m_version is not signed by this controller's release key; refusing to install"
        fi
        say "checksum and signature verified ($m_version)"
    else
        say "openssl is not installed: the signature was not checked (the checksum was)"
    fi
else
    say "no release key known: the signature was not checked (the checksum was)"
fi

# ---- install ----
UPGRADE=false
[ -f "$STATE_DIR/agent.json" ] && UPGRADE=true
if [ "$UPGRADE" = false ] && [ -z "$TOKEN" ]; then
    die "a join token is needed for a new install: --token TOKEN"
fi
install -d -m 0755 "$(dirname "$BIN")" "$CONF_DIR"
install -d -m 0700 "$STATE_DIR"
install -m 0755 "$TMP/agent" "$BIN.new"
mv -f "$BIN.new" "$BIN"
say "installed $BIN ($m_version)"

if [ ! -f "$CONF" ]; then
    [ -n "$CONTROLLER" ] || die "no controller address: pass --controller HOST:PORT"
    {
        echo "# Written by install.sh; edit freely (re-running the installer keeps this file)."
        echo "controller = \"$CONTROLLER\""
        if [ -n "$DEFAULT_REPLICAS" ]; then
            list=''
            for r in $DEFAULT_REPLICAS; do list="$list${list:+, }\"$r\""; done
            echo "replicas = [$list]"
        fi
        echo "state_dir = \"$STATE_DIR\""
        echo
        echo "[update]"
        echo "enabled = $AUTO_UPDATE"
        echo "url = \"$URL\""
        if [ -n "$RELEASE_KEY_HEX" ]; then echo "release_key = \"$RELEASE_KEY_HEX\""; fi
    } > "$CONF.tmp"
    chmod 0644 "$CONF.tmp"
    mv -f "$CONF.tmp" "$CONF"
fi

if [ "$UPGRADE" = true ]; then
    say "already enrolled; keeping this node's identity"
else
    umask 077
    printf '%s\n' "$TOKEN" > "$TMP/token"
    set -- --config "$CONF" join --token-file "$TMP/token" --no-run
    if [ -n "$NAME" ]; then set -- "$@" --name "$NAME"; fi
    for l in $LABELS; do set -- "$@" --label "$l"; done
    "$BIN" "$@" || die "joining the fleet failed"
    umask 022
fi

# ---- service ----
cat > "$UNIT" <<UNIT_EOF
[Unit]
Description=Nebula Command agent
Wants=network-online.target
After=network-online.target docker.service

[Service]
Type=simple
ExecStart=$BIN --config $CONF run
Restart=always
RestartSec=2
# Self-update replaces the binary in place, then restarts the same process.
ReadWritePaths=$(dirname "$BIN") $STATE_DIR
ProtectSystem=full
PrivateTmp=yes
NoNewPrivileges=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectHostname=yes
ProtectClock=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictNamespaces=yes
LockPersonality=yes
UMask=0077
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
UNIT_EOF
chmod 0644 "$UNIT"

if has_systemd; then
    systemctl daemon-reload
    systemctl enable nebula-agent.service >/dev/null 2>&1
    systemctl restart nebula-agent.service
    say "started (systemctl status nebula-agent; journalctl -u nebula-agent)"
else
    # No systemd (a container, a chroot, WSL without it): run in the background, keep a pid file.
    stop_agent
    nohup "$BIN" --config "$CONF" run >> "$LOG" 2>&1 &
    echo $! > "$PIDFILE"
    sleep 1
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || die "the agent did not stay up; see $LOG"
    say "systemd is not running: started in the background (pid $(cat "$PIDFILE"), log $LOG)"
fi
if [ "$UPGRADE" = true ]; then say "upgraded to $m_version"; else say "installed and joined"; fi
