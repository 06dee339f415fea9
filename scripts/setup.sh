#!/usr/bin/env bash
# Set-up shared by `npm start` and `npm test`: install what is missing (Debian packages, npm
# packages), then build. Idempotent and quiet when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-img   || need_pkgs+=(qemu-utils)
have qemu-io    || need_pkgs+=(qemu-utils)
have vmdkinfo   || need_pkgs+=(libvmdk-utils)
have fusermount || need_pkgs+=(fuse)
have mkfs.ext4  || need_pkgs+=(e2fsprogs)
have losetup    || need_pkgs+=(mount)
have setpriv    || need_pkgs+=(util-linux)
have make       || need_pkgs+=(make)
have g++        || need_pkgs+=(g++)
have python3    || need_pkgs+=(python3)
have patch      || need_pkgs+=(patch)
/usr/bin/python3 -c 'import pyvmdk' 2>/dev/null || need_pkgs+=(python3-libvmdk)
ldconfig -p 2>/dev/null | grep -q 'libfuse\.so\.2 ' || need_pkgs+=(libfuse2)

if [ ${#need_pkgs[@]} -gt 0 ]; then
  # de-duplicate
  mapfile -t need_pkgs < <(printf '%s\n' "${need_pkgs[@]}" | sort -u)
  echo "setup: installing Debian packages: ${need_pkgs[*]}"
  if [ "$(id -u)" != 0 ]; then
    echo "setup: not root; run: sudo apt-get update && sudo apt-get install -y ${need_pkgs[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

# npm packages: install when node_modules is missing or older than the lock file.
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "setup: npm ci"
  npm ci --no-audit --no-fund --loglevel=error
fi

# fuse-native from its own C source with our patch (handle leak, per-open cache flags); a fast
# no-op when the patched addon is already built. See native-notes/leak.md.
bash scripts/build-fuse-native.sh

npx tsc -p tsconfig.json
