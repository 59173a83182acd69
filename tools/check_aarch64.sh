#!/bin/sh
# Run the tiny synthetic tests on arm64 under qemu-user, in a Debian arm64 root (a tool, not CI: slow,
# numba compiles every kernel under emulation). Needs root (debootstrap, chroot, binfmt_misc).
#
#   sudo tools/check_aarch64.sh [ROOT] [pytest args...]
#       ROOT defaults to /var/tmp/gguf-flash-arm64 (kept between runs: the second run only copies the
#       checkout and runs the tests); pytest args default to the tiny synthetic tests below.
#
# Steps: apt-get install qemu-user-static debootstrap; register qemu-aarch64 with binfmt_misc (flag F:
# the interpreter works inside the chroot); debootstrap Debian bookworm arm64 with python3; a venv with
# the package's dependencies from PyPI (aarch64 wheels); this checkout copied to ROOT/src; pytest.
set -eu

ROOT=${1:-/var/tmp/gguf-flash-arm64}
[ $# -gt 0 ] && shift
REPO=$(cd "$(dirname "$0")/.." && pwd)
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
TESTS="tests/test_synthetic.py tests/test_architectures.py tests/test_quant_basic.py tests/test_chat_template.py"

say() { printf '%s\n' "check_aarch64: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    say "needs root (debootstrap, chroot, binfmt_misc)"; exit 2
fi

command -v qemu-aarch64-static >/dev/null && command -v debootstrap >/dev/null || {
    say "installing qemu-user-static debootstrap"
    apt-get install -y -q qemu-user-static debootstrap >/dev/null
}

# ---- binfmt_misc: run arm64 ELF files through qemu-aarch64 ----
BINFMT=/proc/sys/fs/binfmt_misc
if [ ! -e "$BINFMT/qemu-aarch64" ]; then
    [ -e "$BINFMT/register" ] || mount -t binfmt_misc binfmt_misc "$BINFMT"
    conf=/usr/lib/binfmt.d/qemu-aarch64.conf
    [ -r "$conf" ] || { say "no $conf (qemu-user-static too old?)"; exit 2; }
    cat "$conf" > "$BINFMT/register"
fi

# ---- the arm64 root ----
if [ ! -x "$ROOT/usr/bin/python3" ]; then
    say "debootstrap $SUITE arm64 into $ROOT (a few minutes)"
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$SUITE" "$ROOT" "$MIRROR" >&2
fi
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# this machine's CA bundle (a TLS-intercepting proxy's CA, if any) for pip inside the root
HOST_CA=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
[ -r "$HOST_CA" ] && cp "$HOST_CA" "$ROOT/etc/ssl/host-ca.crt"
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
trap 'umount "$ROOT/proc" "$ROOT/dev" 2>/dev/null || true' EXIT

PASS="HOME=/root PATH=/opt/venv/bin:/usr/bin:/bin LANG=C.UTF-8"
[ -r "$ROOT/etc/ssl/host-ca.crt" ] && PASS="$PASS PIP_CERT=/etc/ssl/host-ca.crt"
for v in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
    eval "val=\${$v:-}"
    [ -n "$val" ] && PASS="$PASS $v=$val"
done
# shellcheck disable=SC2086
in_root() { chroot "$ROOT" /usr/bin/env -i $PASS "$@"; }

say "arm64 check: $(in_root uname -m)"
if [ ! -e "$ROOT/opt/venv/.installed" ]; then
    say "venv with the dependencies (aarch64 wheels from PyPI)"
    in_root python3 -m venv /opt/venv
    in_root pip install -q gguf numpy numba sentencepiece psutil tokenizers jinja2 tqdm pytest >&2
    touch "$ROOT/opt/venv/.installed"
fi

# ---- this checkout, then the tests ----
rm -rf "$ROOT/src"
mkdir -p "$ROOT/src"
(cd "$REPO" && tar --exclude=.git --exclude='__pycache__' --exclude='*.gguf' -cf - .) | tar -C "$ROOT/src" -xf -
say "pytest under qemu (numba compiles every kernel once: expect tens of minutes)"
if [ $# -gt 0 ]; then
    set -- "$@"
else
    # shellcheck disable=SC2086
    set -- $TESTS
fi
in_root GGUF_FLASH_CACHE=/root/.cache/gguf-flash sh -c 'cd /src && python -m pytest -q -p no:cacheprovider "$@"' \
    pytest "$@"
