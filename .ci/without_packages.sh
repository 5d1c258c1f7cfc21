#!/usr/bin/env bash
# .ci/without_packages.sh PKG... -- CMD [ARG...]
# Runs CMD as on a machine without the named Debian packages: in a private mount namespace
# (the machine itself is untouched), every file the packages installed is covered by
# /dev/null, so a configure step that looks for one of them (pkg-config, a header, a CMake
# config) finds nothing and fails as it would there. Needs root (unshare, mount).
set -euo pipefail
pkgs=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do pkgs+=("$1"); shift; done
[ $# -ge 2 ] || { echo "usage: $0 PKG... -- CMD [ARG...]" >&2; exit 2; }
shift
if [ -z "${MP_WITHOUT_PACKAGES_NS:-}" ]; then
    exec unshare --mount --propagation private env MP_WITHOUT_PACKAGES_NS=1 "$0" "${pkgs[@]}" -- "$@"
fi
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || continue   # absent: nothing to hide
    n=0
    while read -r f; do
        [ -f "$f" ] || continue           # regular files, and the files that symlinks name
        mount --bind /dev/null "$f"
        [ -s "$f" ] && { echo "$0: could not hide $f" >&2; exit 1; }
        n=$((n + 1))
    done < <(dpkg-query -L "$p")
    echo "$0: $p hidden ($n files)"
done
exec "$@"
