# shellcheck shell=bash
#
# Fetch and cache Debian's bookworm-backports Linux 6.12 amd64 kernel for
# scripts/vm (sourced by scripts/vm and scripts/install-deps).
#
# The kernel is downloaded with a private apt configuration that lives in the
# cache directory, so the system's apt configuration and state are never
# modified.  The Debian mirror and its keyring are derived at run time from the
# system's apt sources.
#
# Cache layout (default ${DMABUFD_CACHE:-$HOME/.cache/dmabufd}/kernel):
#   apt/                 private apt config, lists and download cache
#   current              name of the release in use, e.g. 6.12.95+deb12-amd64
#   RELEASE/root/        the extracted package (boot/vmlinuz-RELEASE,
#                        lib/modules/RELEASE with modules.dep)
#   RELEASE/package      "PACKAGE VERSION" that was extracted
#   RELEASE/.complete    marker written last
#
# Public function:
#   dmabufd_kernel_ensure [--refresh]
#     Makes sure a kernel is cached (network only when nothing is cached, or
#     with --refresh) and sets DMABUFD_KERNEL_RELEASE, DMABUFD_KERNEL_IMAGE,
#     DMABUFD_KERNEL_ROOT and DMABUFD_KERNEL_PACKAGE.  Progress goes to stderr.
#
# Environment:
#   DMABUFD_CACHE           cache root (default $HOME/.cache/dmabufd)
#   DMABUFD_DEBIAN_MIRROR   override the mirror URI derived from apt sources
#   DMABUFD_DEBIAN_KEYRING  override the keyring (Signed-By) for that mirror

DMABUFD_KERNEL_SUITE=bookworm-backports
DMABUFD_KERNEL_SERIES=6.12

dmabufd_kernel_log() { printf 'kernel: %s\n' "$*" >&2; }
dmabufd_kernel_die() { printf 'kernel: error: %s\n' "$*" >&2; return 1; }

dmabufd_kernel_cache_dir() {
    printf '%s/kernel\n' "${DMABUFD_CACHE:-${HOME:?HOME is not set}/.cache/dmabufd}"
}

# Prints "URI KEYRING" (KEYRING may be empty) of the first Debian source whose
# URI is not a -security archive.
dmabufd_kernel_debian_source() {
    local f line
    f=/etc/apt/sources.list.d/debian.sources
    if [[ -r $f ]]; then
        line=$(awk '
            function flush(   n, a, i) {
                if (!done && uris != "" && types ~ /(^|[ \t])deb([ \t]|$)/ && enabled != "no") {
                    n = split(uris, a, /[ \t]+/)
                    for (i = 1; i <= n; i++) {
                        if (a[i] != "" && a[i] !~ /-security\/?$/) {
                            print a[i], key
                            done = 1
                            break
                        }
                    }
                }
                uris = ""; key = ""; types = ""; enabled = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            {
                field = tolower($1)
                value = $0
                sub(/^[^:]*:[ \t]*/, "", value)
                if (field == "uris:") uris = value
                else if (field == "types:") types = value
                else if (field == "signed-by:" && value ~ /^\//) key = value
                else if (field == "enabled:") enabled = tolower(value)
            }
            END { flush() }
        ' "$f")
        if [[ -n $line ]]; then
            printf '%s\n' "$line"
            return 0
        fi
    fi
    # One-line format fallback: deb [signed-by=KEY ...] URI SUITE COMPONENTS...
    f=/etc/apt/sources.list
    if [[ -r $f ]]; then
        line=$(awk '
            $1 != "deb" { next }
            {
                key = ""; i = 2
                if ($2 ~ /^\[/) {
                    for (; i <= NF; i++) {
                        if ($i ~ /^\[?signed-by=/) { key = $i; sub(/^\[?signed-by=/, "", key); sub(/\]$/, "", key) }
                        if ($i ~ /\]$/) { i++; break }
                    }
                }
                if ($i !~ /-security\/?$/) { print $i, key; exit }
            }
        ' "$f")
        if [[ -n $line ]]; then
            printf '%s\n' "$line"
            return 0
        fi
    fi
    return 1
}

# Checks that CACHE/RELEASE is a complete extracted kernel.
dmabufd_kernel_valid() {
    local dir=$1 rel=$2
    [[ -f $dir/$rel/.complete &&
        -f $dir/$rel/root/boot/vmlinuz-$rel &&
        -f $dir/$rel/root/lib/modules/$rel/modules.dep ]]
}

dmabufd_kernel_set_vars() {
    local dir=$1 rel=$2
    DMABUFD_KERNEL_RELEASE=$rel
    DMABUFD_KERNEL_ROOT=$dir/$rel/root
    DMABUFD_KERNEL_IMAGE=$dir/$rel/root/boot/vmlinuz-$rel
    DMABUFD_KERNEL_PACKAGE=$(cat "$dir/$rel/package" 2>/dev/null || true)
}

dmabufd_kernel_find_tool() {
    local t=$1 d
    if command -v "$t" >/dev/null 2>&1; then
        command -v "$t"
        return 0
    fi
    for d in /usr/sbin /sbin; do
        if [[ -x $d/$t ]]; then
            printf '%s\n' "$d/$t"
            return 0
        fi
    done
    return 1
}

# Downloads and extracts the newest bookworm-backports 6.12 amd64 kernel into
# DIR.  Caller holds the cache lock.
dmabufd_kernel_fetch() {
    local dir=$1 apt=$1/apt src mirror keyring pkg rel ver deb tmp depmod
    local -a opts

    if [[ -n ${DMABUFD_DEBIAN_MIRROR:-} ]]; then
        mirror=$DMABUFD_DEBIAN_MIRROR
        keyring=${DMABUFD_DEBIAN_KEYRING:-}
    else
        src=$(dmabufd_kernel_debian_source) ||
            dmabufd_kernel_die "cannot derive a Debian mirror from /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list (set DMABUFD_DEBIAN_MIRROR)" || return 1
        mirror=${src%% *}
        keyring=${DMABUFD_DEBIAN_KEYRING:-${src#* }}
        [[ $keyring == "$src" ]] && keyring=
    fi
    mirror=${mirror%/}
    depmod=$(dmabufd_kernel_find_tool depmod) ||
        dmabufd_kernel_die "depmod not found (install kmod)" || return 1
    command -v apt-get >/dev/null && command -v apt-cache >/dev/null && command -v dpkg-deb >/dev/null ||
        dmabufd_kernel_die "apt-get, apt-cache and dpkg-deb are required" || return 1

    mkdir -p "$apt/etc/preferences.d" "$apt/state/lists/partial" "$apt/cache/archives/partial" "$apt/debs" ||
        dmabufd_kernel_die "cannot create $apt" || return 1
    if [[ -n $keyring ]]; then
        printf 'deb [signed-by=%s] %s %s main\n' "$keyring" "$mirror" "$DMABUFD_KERNEL_SUITE" >"$apt/etc/sources.list"
    else
        printf 'deb %s %s main\n' "$mirror" "$DMABUFD_KERNEL_SUITE" >"$apt/etc/sources.list"
    fi
    opts=(
        -o "Dir::Etc::SourceList=$apt/etc/sources.list"
        -o "Dir::Etc::SourceParts=/dev/null"
        -o "Dir::Etc::Preferences=/dev/null"
        -o "Dir::Etc::PreferencesParts=$apt/etc/preferences.d"
        -o "Dir::State=$apt/state"
        -o "Dir::State::Lists=$apt/state/lists"
        -o "Dir::State::status=/dev/null"
        -o "Dir::Cache=$apt/cache"
        -o "APT::Architecture=amd64"
        -o "APT::Architectures::=amd64"
        -o "Acquire::Languages=none"
    )
    # The cache usually lives under a home directory that the unprivileged
    # _apt user cannot enter; apt would fall back (with a warning) anyway.
    if [[ $EUID -eq 0 ]]; then opts+=(-o "APT::Sandbox::User=root"); fi

    dmabufd_kernel_log "updating package lists for $DMABUFD_KERNEL_SUITE from $mirror"
    apt-get -qq "${opts[@]}" update >&2 ||
        dmabufd_kernel_die "apt-get update for $DMABUFD_KERNEL_SUITE failed" || return 1

    # linux-image-6.12.N+debXX-amd64-unsigned (or the older +bpo naming);
    # the pattern excludes the -cloud-amd64 and -rt-amd64 flavours.
    pkg=$(apt-cache "${opts[@]}" search --names-only \
        "^linux-image-${DMABUFD_KERNEL_SERIES//./\\.}\.[0-9]+(\+[a-z0-9.~]+)?-amd64-unsigned\$" |
        awk '{print $1}' | sort -V | tail -n 1)
    if [[ -z $pkg ]]; then
        # Fall back to the signed image (same kernel, same modules).
        pkg=$(apt-cache "${opts[@]}" search --names-only \
            "^linux-image-${DMABUFD_KERNEL_SERIES//./\\.}\.[0-9]+(\+[a-z0-9.~]+)?-amd64\$" |
            awk '{print $1}' | sort -V | tail -n 1)
    fi
    [[ -n $pkg ]] ||
        dmabufd_kernel_die "no linux-image-${DMABUFD_KERNEL_SERIES}*-amd64[-unsigned] package in $DMABUFD_KERNEL_SUITE" || return 1
    ver=$(apt-cache "${opts[@]}" show --no-all-versions "$pkg" | awk '/^Version:/{print $2; exit}')
    rel=${pkg#linux-image-}
    rel=${rel%-unsigned}

    if dmabufd_kernel_valid "$dir" "$rel"; then
        dmabufd_kernel_log "newest is $pkg $ver, already cached"
    else
        dmabufd_kernel_log "downloading $pkg $ver"
        rm -f "$apt/debs/"*.deb
        (cd "$apt/debs" && apt-get -qq "${opts[@]}" download "$pkg" >&2) ||
            dmabufd_kernel_die "apt-get download $pkg failed" || return 1
        deb=$(find "$apt/debs" -maxdepth 1 -name '*.deb' -print -quit)
        [[ -n $deb ]] || dmabufd_kernel_die "downloaded .deb not found" || return 1

        tmp=$dir/.extract.$$
        rm -rf "$tmp"
        mkdir -p "$tmp/root"
        dmabufd_kernel_log "extracting $(basename "$deb")"
        dpkg-deb -x "$deb" "$tmp/root" ||
            { rm -rf "$tmp"; dmabufd_kernel_die "dpkg-deb -x failed"; return 1; }
        # Newer packages may ship modules under usr/lib/modules only.
        if [[ ! -d $tmp/root/lib/modules/$rel && -d $tmp/root/usr/lib/modules/$rel ]]; then
            mkdir -p "$tmp/root/lib"
            ln -s ../usr/lib/modules "$tmp/root/lib/modules"
        fi
        if [[ ! -f $tmp/root/boot/vmlinuz-$rel || ! -d $tmp/root/lib/modules/$rel ]]; then
            rm -rf "$tmp"
            dmabufd_kernel_die "$pkg does not contain boot/vmlinuz-$rel and lib/modules/$rel"
            return 1
        fi
        dmabufd_kernel_log "running depmod for $rel"
        "$depmod" -a -b "$tmp/root" "$rel" ||
            { rm -rf "$tmp"; dmabufd_kernel_die "depmod failed"; return 1; }
        printf '%s %s\n' "$pkg" "$ver" >"$tmp/package"
        touch "$tmp/.complete"
        rm -rf "${dir:?}/$rel"
        mv "$tmp" "$dir/$rel" || dmabufd_kernel_die "cannot move $tmp to $dir/$rel" || return 1
        rm -f "$deb"
    fi

    local cfg=$dir/$rel/root/boot/config-$rel opt
    if [[ -f $cfg ]]; then
        for opt in CONFIG_UDMABUF=y CONFIG_DMABUF_HEAPS_SYSTEM=y CONFIG_DRM_VGEM=m; do
            grep -qx "$opt" "$cfg" || dmabufd_kernel_log "warning: $cfg lacks $opt"
        done
    fi

    printf '%s\n' "$rel" >"$dir/current.tmp.$$" &&
        mv "$dir/current.tmp.$$" "$dir/current" ||
        dmabufd_kernel_die "cannot write $dir/current" || return 1
}

dmabufd_kernel_ensure() {
    local refresh=0 dir rel lockfd rc=0
    [[ ${1:-} == --refresh ]] && refresh=1
    dir=$(dmabufd_kernel_cache_dir)

    # Fast path: cached and no refresh requested; no lock, no network.
    if ((!refresh)) && [[ -f $dir/current ]]; then
        rel=$(cat "$dir/current")
        if [[ -n $rel ]] && dmabufd_kernel_valid "$dir" "$rel"; then
            dmabufd_kernel_set_vars "$dir" "$rel"
            return 0
        fi
    fi

    mkdir -p "$dir"
    exec {lockfd}>"$dir/.lock"
    if command -v flock >/dev/null 2>&1; then
        flock "$lockfd"
    fi
    # Another process may have fetched it while we waited for the lock.
    rel=
    if ((!refresh)) && [[ -f $dir/current ]]; then
        rel=$(cat "$dir/current")
        dmabufd_kernel_valid "$dir" "$rel" || rel=
    fi
    if [[ -z $rel ]]; then
        dmabufd_kernel_fetch "$dir" || rc=$?
        [[ $rc -eq 0 ]] && rel=$(cat "$dir/current")
    fi
    exec {lockfd}>&-
    ((rc == 0)) || return "$rc"
    dmabufd_kernel_set_vars "$dir" "$rel"
    dmabufd_kernel_log "using $rel (${DMABUFD_KERNEL_PACKAGE:-?}) from $dir/$rel"
}
