#!/usr/bin/env bash
# Build node_modules/fuse-native/build/Release/fuse.node from fuse-native 2.2.6's C source with
# scripts/native/fuse-native-thread-locals.patch applied (fixes the async-handle leak, adds
# per-open cache flags, keeps idle worker threads and parks all but a few: native-notes/leak.md). node-gyp-build loads build/Release/fuse.node in preference to the
# prebuild, so `require('fuse-native')` then runs the patched addon.
#
#   bash scripts/build-fuse-native.sh            build if needed (fast no-op when up to date)
#   bash scripts/build-fuse-native.sh --force    rebuild
#   bash scripts/build-fuse-native.sh --check    verify the installed build, never build
#
# Offline: Node's headers come from the local installation (--nodedir, never downloaded),
# libfuse's headers from fuse-shared-library-linux. Needs make, g++ and python3.
# Every failure is fatal and says why.
set -euo pipefail
cd "$(dirname "$0")/.."

PKG=node_modules/fuse-native
PATCH=scripts/native/fuse-native-thread-locals.patch
STAMP=$PKG/build/redofs-patch.stamp
# sha256 of fuse-native.c as published in fuse-native 2.2.6
PRISTINE_SHA=e20f3726f19bc22613377b6b2e1516d8aacec09eca2ae79398cae612db7da7e8
EXPECTED_VERSION=2.2.6
PATCH_LEVEL=6

mode=build
case "${1:-}" in
  '') ;;
  --force) mode=force ;;
  --check) mode=check ;;
  *) echo "usage: $0 [--force|--check]" >&2; exit 2 ;;
esac

die() { echo "build-fuse-native: ERROR: $*" >&2; exit 1; }
say() { echo "build-fuse-native: $*"; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

[ -f "$PKG/package.json" ] || die "$PKG is missing: run 'npm ci' first"
[ -f "$PATCH" ] || die "$PATCH is missing"
command -v node >/dev/null || die "node not found on PATH"
version=$(node -p "require('./$PKG/package.json').version")
[ "$version" = "$EXPECTED_VERSION" ] || die "fuse-native $version installed, but $PATCH is for $EXPECTED_VERSION: update the patch (and PRISTINE_SHA) or pin fuse-native to $EXPECTED_VERSION"

uv_runtime=$(node -p process.versions.uv)
patch_sha=$(sha "$PATCH")
want_stamp="patch=$patch_sha uv=$uv_runtime level=$PATCH_LEVEL"

# Verify the build in place: right binary chosen, patch present, system libfuse.
verify() {
  local addon=$PKG/build/Release/fuse.node
  [ -f "$addon" ] || die "$addon was not built"
  # which binary does node-gyp-build pick, and does it carry the patch?
  node -e "
    const path = require('path')
    const dir = path.resolve('$PKG')
    for (const v of ['PREBUILDS_ONLY', 'FUSE_NATIVE_PREBUILD']) {
      if (process.env[v]) console.error('build-fuse-native: WARNING: ' + v + ' is set: node-gyp-build will not load build/Release')
    }
    const gypBuild = require(require.resolve('node-gyp-build', { paths: [dir] }))
    const chosen = gypBuild.path(dir)
    if (chosen !== path.join(dir, 'build/Release/fuse.node')) throw new Error('node-gyp-build picks ' + chosen + ', not build/Release/fuse.node')
    const b = require(chosen)
    if (b.redofs_patch_level !== $PATCH_LEVEL) throw new Error('build/Release/fuse.node lacks the redofs patch (redofs_patch_level=' + b.redofs_patch_level + ')')
    require(dir)  // index.js loads as the app would
  " || die "the built addon does not load (see above)"
  local line
  line=$(ldd "$addon" | grep 'libfuse\.so\.2' || true)
  [ -n "$line" ] || die "$addon does not link libfuse.so.2 (ldd: $(ldd "$addon" | tr '\n' ' '))"
  case "$line" in
    *'not found'*) die "libfuse.so.2 not found at run time: apt-get install -y libfuse2 ($line)" ;;
    *node_modules*) die "$addon resolves libfuse.so.2 inside node_modules, not the system's: $line" ;;
  esac
  say "ok: $addon (patch level $PATCH_LEVEL) uses$(echo "$line" | sed 's/^[[:space:]]*libfuse.so.2//')"
}

up_to_date() {
  [ -f "$STAMP" ] && [ -f "$PKG/build/Release/fuse.node" ] || return 1
  local stamp
  stamp=$(cat "$STAMP")
  [ "${stamp% addon=*}" = "$want_stamp" ] || return 1
  [ "${stamp##* addon=}" = "$(sha "$PKG/build/Release/fuse.node")" ] || return 1
}

if [ "$mode" = check ]; then
  up_to_date || die "no up-to-date patched build: run bash scripts/build-fuse-native.sh"
  verify
  exit 0
fi

# one build at a time (npm test and npm start may race)
exec 9>"$PKG/.redofs-build.lock"
flock 9

if [ "$mode" = build ] && up_to_date; then
  exit 0
fi

say "building patched fuse-native $version (uv $uv_runtime) from source"

for tool in make g++ python3 patch ldd; do
  command -v "$tool" >/dev/null || die "$tool not found: apt-get install -y make g++ python3 patch"
done

# Node headers: never download. NODEDIR, else npm's nodedir, else the prefix of the node binary.
nodedir=${NODEDIR:-}
if [ -z "$nodedir" ]; then
  nodedir=$(npm config get nodedir 2>/dev/null || true)
  case "$nodedir" in undefined|null) nodedir= ;; esac
fi
[ -n "$nodedir" ] || nodedir=$(dirname "$(dirname "$(readlink -f "$(command -v node)")")")
[ -f "$nodedir/include/node/node_api.h" ] && [ -f "$nodedir/include/node/common.gypi" ] \
  || die "Node headers not found under '$nodedir' (need include/node/node_api.h and common.gypi); set NODEDIR to a Node installation or headers tarball directory matching $(node -v)"
uv_headers=$(sed -n 's/^#define UV_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\).*/\2/p' "$nodedir/include/node/uv/version.h" | paste -sd.)
# the patch puts uv_async_t inside its own structs: the header layout must be the runtime's
[ "${uv_headers%.*}" = "${uv_runtime%.*}" ] \
  || die "headers in $nodedir are for libuv $uv_headers but node runs libuv $uv_runtime: point NODEDIR at headers for $(node -v)"

# node-gyp: NODE_GYP, else the one bundled with npm.
node_gyp=${NODE_GYP:-}
if [ -z "$node_gyp" ]; then
  for c in "$(dirname "$(dirname "$(readlink -f "$(command -v node)")")")/lib/node_modules/npm/node_modules/node-gyp/bin/node-gyp.js" \
           "$(npm root -g 2>/dev/null)/npm/node_modules/node-gyp/bin/node-gyp.js"; do
    if [ -f "$c" ]; then node_gyp=$c; break; fi
  done
fi
[ -n "$node_gyp" ] && [ -f "$node_gyp" ] || die "node-gyp not found (it ships with npm); set NODE_GYP=/path/to/node-gyp.js"

# Source: always start from the published file, keep it as fuse-native.c.orig.
src=$PKG/fuse-native.c
orig=$PKG/fuse-native.c.orig
if [ -f "$orig" ]; then
  [ "$(sha "$orig")" = "$PRISTINE_SHA" ] || die "$orig is not fuse-native $EXPECTED_VERSION's fuse-native.c: rm -rf $PKG && npm ci"
else
  [ "$(sha "$src")" = "$PRISTINE_SHA" ] || die "$src is not fuse-native $EXPECTED_VERSION's fuse-native.c (modified?): rm -rf $PKG && npm ci"
  cp "$src" "$orig"
fi
cp "$orig" "$src"
patch -p1 --batch --forward --no-backup-if-mismatch --quiet -d "$PKG" < "$PATCH" \
  || { cp "$orig" "$src"; die "$PATCH does not apply to fuse-native $version"; }

rm -f "$STAMP"
# node-gyp also needs napi-macros and fuse-shared-library (resolved from $PKG by binding.gyp)
log=$(mktemp)
if ! (cd "$PKG" && node "$node_gyp" rebuild --nodedir="$nodedir" --jobs=2 --loglevel=warn) >"$log" 2>&1; then
  cat "$log" >&2
  rm -f "$log"
  die "node-gyp rebuild failed (log above)"
fi
grep -i 'warning' "$log" >&2 || true
rm -f "$log"

verify
printf '%s addon=%s\n' "$want_stamp" "$(sha "$PKG/build/Release/fuse.node")" > "$STAMP.tmp"
mv "$STAMP.tmp" "$STAMP"
say "done"
