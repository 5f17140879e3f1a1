#!/bin/sh
# Builds libdmabufd and runs its C tests: the exported-symbol checks, the unit tests (codec round trips,
# malformed input, a fake daemon), an install into a scratch DESTDIR with a pkg-config build against it.
# Ends with "clib: N passed, M failed". Set CLIB_FUZZ=1 to add the 30 s fuzz smoke run.
cd "$(dirname "$0")" || exit 1
passed=0 failed=0
step() {
    name=$1; shift
    if out=$("$@" 2>&1); then passed=$((passed + 1)); echo "ok   $name"
    else failed=$((failed + 1)); echo "FAIL $name"; echo "$out" | tail -20; fi
}
step build make -s all
step exports make -s check-exports
if make -s build/wire_test >/dev/null 2>&1; then
    out=$(./build/wire_test); echo "$out" | grep -v '^clib:'
    p=$(echo "$out" | sed -n 's/^clib: \([0-9]*\) passed, \([0-9]*\) failed$/\1/p')
    f=$(echo "$out" | sed -n 's/^clib: \([0-9]*\) passed, \([0-9]*\) failed$/\2/p')
    passed=$((passed + ${p:-0})); failed=$((failed + ${f:-1}))
else
    failed=$((failed + 1)); echo "FAIL unit tests do not build"
fi
install_check() {
    d=$(mktemp -d) || return 1
    make -s install PREFIX=/opt/dmabufd DESTDIR="$d" >/dev/null || return 1
    cat > "$d/client.c" <<'C'
#include <dmabufd.h>
#include <stdio.h>
int main(void) { dmabufd_conn *c; int e = dmabufd_connect("/nonexistent", NULL, &c); printf("%d\n", e); return e < 0 ? 0 : 1; }
C
    flags=$(PKG_CONFIG_SYSROOT_DIR="$d" PKG_CONFIG_LIBDIR="$d/opt/dmabufd/lib/pkgconfig" pkg-config --cflags --libs dmabufd) || return 1
    cc "$d/client.c" -o "$d/client" $flags -Wl,-rpath,"$d/opt/dmabufd/lib" && "$d/client" >/dev/null
    r=$?
    test -x "$d/opt/dmabufd/bin/dmabufd-run" && test -f "$d/opt/dmabufd/lib/libdmabufd-preload.so" || r=1
    rm -rf "$d"
    return $r
}
if command -v pkg-config >/dev/null; then step "install + pkg-config" install_check; fi
if [ "${CLIB_FUZZ:-0}" = 1 ]; then step "fuzz 30 s" ./fuzz.sh 30; fi
echo "clib: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
