#!/bin/sh
# fetch-selftests.sh [DIR]: puts the kernel's own dma-buf selftests, unmodified, under DIR (default
# ${DMABUFD_CACHE:-$HOME/.cache/dmabufd}/selftests/6.12), for the device test clib.kernel-selftests:
#   tools/testing/selftests/kselftest.h
#   tools/testing/selftests/dmabuf-heaps/dmabuf-heap.c
#   tools/testing/selftests/drivers/dma-buf/udmabuf.c
#   include/uapi/drm/drm.h, drm_mode.h (the heap test includes <drm/drm.h>, which the kernel build takes from its own uapi)
# They come from Debian's linux-source-6.12 package through apt (the only network access; run it before
# the VM, which has none). The .deb is ~150 MB and is deleted after extraction. Idempotent.
set -eu
dir=${1:-${DMABUFD_CACHE:-$HOME/.cache/dmabufd}/selftests/6.12}
files="tools/testing/selftests/kselftest.h tools/testing/selftests/dmabuf-heaps/dmabuf-heap.c tools/testing/selftests/drivers/dma-buf/udmabuf.c include/uapi/drm/drm.h include/uapi/drm/drm_mode.h"
have=1
for f in $files; do [ -f "$dir/$f" ] || have=0; done
if [ $have = 1 ]; then echo "fetch-selftests: already in $dir"; exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 0755 "$work" # apt's download user must be able to write here
(cd "$work" && apt-get download -q linux-source-6.12)
deb=$(ls "$work"/linux-source-6.12_*.deb)
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$work" --wildcards './usr/src/linux-source-6.12.tar.*'
rm -f "$deb"
archive=$(ls "$work"/usr/src/linux-source-6.12.tar.*)
members=""
for f in $files; do members="$members linux-source-6.12/$f"; done
# shellcheck disable=SC2086
tar -xf "$archive" -C "$work" $members
mkdir -p "$dir"
for f in $files; do
    mkdir -p "$dir/$(dirname "$f")"
    cp "$work/linux-source-6.12/$f" "$dir/$f"
done
echo "fetch-selftests: $(echo $files | wc -w) files in $dir"
