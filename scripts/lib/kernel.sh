# shellcheck shell=bash
#
# Fetch and cache the test kernels for scripts/vm (sourced by scripts/vm,
# scripts/install-deps, scripts/test-systemd and scripts/build-kernel).
#
# Kernels (the name is what `scripts/vm --kernel` takes):
#   6.12     Debian bookworm-backports linux-image-6.12.N+debXX-amd64-unsigned
#            (image and modules in one package, boot/vmlinuz-RELEASE)
#   7.3      Debian trixie-backports linux-image-7.3.N+deb13-amd64, a
#            metapackage: the image is in linux-binary-RELEASE, the modules in
#            linux-modules-RELEASE, config and modules.builtin in
#            linux-base-RELEASE, all under usr/lib/modules/RELEASE/
#   7.3-cma  the project's own build of Debian's linux-source-7.3 with the CMA
#            heap and sw_sync, everything built in (kernels/README.md): the
#            image beside the checkout in ../shared/kernels when its SHA256SUMS
#            matches, else one built by scripts/build-kernel into the cache
#
# The kernel is downloaded with a private apt configuration that lives in the
# cache directory, so the system's apt configuration and state are never
# modified.  The Debian mirror and its keyring are derived at run time from the
# system's apt sources.
#
# Cache layout for the Debian kernels (default
# ${DMABUFD_CACHE:-$HOME/.cache/dmabufd}/kernel for 6.12, .../kernel-7.3 for 7.3):
#   apt/                 private apt config, lists and download cache
#   current              name of the release in use, e.g. 6.12.95+deb12-amd64
#   RELEASE/root/        the extracted packages (boot/vmlinuz-RELEASE or
#                        usr/lib/modules/RELEASE/vmlinuz, lib/modules/RELEASE
#                        with modules.dep)
#   RELEASE/package      "PACKAGE VERSION" that was extracted
#   RELEASE/.complete    marker written last
#
# Public function:
#   dmabufd_kernel_ensure [--refresh] [--kernel 6.12|7.3|7.3-cma]
#     Makes sure a kernel is cached (network only when nothing is cached, or
#     with --refresh; 7.3-cma may build one, ~20 minutes) and sets
#     DMABUFD_KERNEL_NAME, DMABUFD_KERNEL_RELEASE, DMABUFD_KERNEL_IMAGE,
#     DMABUFD_KERNEL_ROOT (empty for 7.3-cma: no modules),
#     DMABUFD_KERNEL_PACKAGE and DMABUFD_KERNEL_APPEND (extra kernel command
#     line).  The kernel defaults to $DMABUFD_KERNEL, else 6.12.  Progress
#     goes to stderr.
#
# Environment:
#   DMABUFD_CACHE           cache root (default $HOME/.cache/dmabufd)
#   DMABUFD_DEBIAN_MIRROR   override the mirror URI derived from apt sources
#   DMABUFD_DEBIAN_KEYRING  override the keyring (Signed-By) for that mirror

DMABUFD_KERNEL_SUITE=bookworm-backports
DMABUFD_KERNEL_SERIES=6.12
DMABUFD_KERNEL_NAMES="6.12 7.3 7.3-cma"
# The CMA kernel's release and where the shared prebuilt copy lives (beside the
# checkout; CI places a copy of shared/ next to its clone).
DMABUFD_CMA_RELEASE=7.3.4-dmabufd
dmabufd_kernel_lib_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DMABUFD_CMA_SHARED_DIR=${DMABUFD_CMA_SHARED_DIR:-$dmabufd_kernel_lib_dir/../../../shared/kernels}

# Sets the suite, series and cache directory for kernel NAME.
dmabufd_kernel_select() {
    case $1 in
        6.12) DMABUFD_KERNEL_SUITE=bookworm-backports DMABUFD_KERNEL_SERIES=6.12 DMABUFD_KERNEL_APPEND= ;;
        # 7.x charges system-heap allocations to the allocator's memory cgroup
        # only with this parameter (issue 11).
        7.3) DMABUFD_KERNEL_SUITE=trixie-backports DMABUFD_KERNEL_SERIES=7.3 DMABUFD_KERNEL_APPEND=dma_heap.mem_accounting=1 ;;
        7.3-cma) DMABUFD_KERNEL_SUITE= DMABUFD_KERNEL_SERIES=7.3 DMABUFD_KERNEL_APPEND=dma_heap.mem_accounting=1 ;;
        *) dmabufd_kernel_die "unknown kernel '$1' (one of: $DMABUFD_KERNEL_NAMES)"; return 1 ;;
    esac
    DMABUFD_KERNEL_NAME=$1
}

dmabufd_kernel_log() { printf 'kernel: %s\n' "$*" >&2; }
dmabufd_kernel_die() { printf 'kernel: error: %s\n' "$*" >&2; return 1; }

# 6.12 keeps the historical directory name so existing caches stay valid.
dmabufd_kernel_cache_dir() {
    local root=${DMABUFD_CACHE:-${HOME:?HOME is not set}/.cache/dmabufd}
    case ${DMABUFD_KERNEL_NAME:-6.12} in
        6.12) printf '%s/kernel\n' "$root" ;;
        *) printf '%s/kernel-%s\n' "$root" "$DMABUFD_KERNEL_NAME" ;;
    esac
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
    [[ -f $dir/$rel/.complete && -n $(dmabufd_kernel_image_in "$dir/$rel/root" "$rel") &&
        -f $dir/$rel/root/lib/modules/$rel/modules.dep ]]
}

# Prints the image inside an extracted ROOT: boot/vmlinuz-RELEASE (bookworm
# packages) or usr/lib/modules/RELEASE/vmlinuz (trixie's linux-binary-*).
dmabufd_kernel_image_in() {
    local root=$1 rel=$2 f
    for f in "$root/boot/vmlinuz-$rel" "$root/usr/lib/modules/$rel/vmlinuz"; do
        if [[ -f $f ]]; then printf '%s\n' "$f"; return 0; fi
    done
}

dmabufd_kernel_set_vars() {
    local dir=$1 rel=$2
    DMABUFD_KERNEL_RELEASE=$rel
    DMABUFD_KERNEL_ROOT=$dir/$rel/root
    DMABUFD_KERNEL_IMAGE=$(dmabufd_kernel_image_in "$dir/$rel/root" "$rel")
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

# Writes a private apt configuration under APT for SUITE of the system's Debian
# mirror, runs `apt-get update` with it, and leaves the apt options in the
# global array DMABUFD_APT_OPTS.  Never touches the system's apt state.
dmabufd_kernel_apt_setup() {
    local apt=$1 suite=$2 src mirror keyring
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
    command -v apt-get >/dev/null && command -v apt-cache >/dev/null && command -v dpkg-deb >/dev/null ||
        dmabufd_kernel_die "apt-get, apt-cache and dpkg-deb are required" || return 1

    mkdir -p "$apt/etc/preferences.d" "$apt/state/lists/partial" "$apt/cache/archives/partial" "$apt/debs" ||
        dmabufd_kernel_die "cannot create $apt" || return 1
    if [[ -n $keyring ]]; then
        printf 'deb [signed-by=%s] %s %s main\n' "$keyring" "$mirror" "$suite" >"$apt/etc/sources.list"
    else
        printf 'deb %s %s main\n' "$mirror" "$suite" >"$apt/etc/sources.list"
    fi
    DMABUFD_APT_OPTS=(
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
    if [[ $EUID -eq 0 ]]; then DMABUFD_APT_OPTS+=(-o "APT::Sandbox::User=root"); fi

    dmabufd_kernel_log "updating package lists for $suite from $mirror"
    apt-get -qq "${DMABUFD_APT_OPTS[@]}" update >&2 ||
        dmabufd_kernel_die "apt-get update for $suite failed" || return 1
}

# Downloads and extracts the newest amd64 kernel of the selected series from
# the selected suite into DIR.  Caller holds the cache lock.
dmabufd_kernel_fetch() {
    local dir=$1 apt=$1/apt pkg rel ver deb tmp depmod p
    local -a opts pkgs

    depmod=$(dmabufd_kernel_find_tool depmod) ||
        dmabufd_kernel_die "depmod not found (install kmod)" || return 1
    dmabufd_kernel_apt_setup "$apt" "$DMABUFD_KERNEL_SUITE" || return 1
    opts=("${DMABUFD_APT_OPTS[@]}")

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
    # Since trixie the image package is a metapackage: the kernel, its modules
    # and its config come in linux-binary-, linux-modules- and linux-base-.
    pkgs=("$pkg")
    if apt-cache "${opts[@]}" show --no-all-versions "linux-binary-$rel" >/dev/null 2>&1; then
        pkgs=("linux-binary-$rel" "linux-modules-$rel" "linux-base-$rel")
    fi

    if dmabufd_kernel_valid "$dir" "$rel"; then
        dmabufd_kernel_log "newest is $pkg $ver, already cached"
    else
        dmabufd_kernel_log "downloading ${pkgs[*]} ($ver)"
        rm -f "$apt/debs/"*.deb
        (cd "$apt/debs" && apt-get -qq "${opts[@]}" download "${pkgs[@]}" >&2) ||
            dmabufd_kernel_die "apt-get download ${pkgs[*]} failed" || return 1

        tmp=$dir/.extract.$$
        rm -rf "$tmp"
        mkdir -p "$tmp/root"
        for p in "${pkgs[@]}"; do
            deb=$(find "$apt/debs" -maxdepth 1 -name "${p}_*.deb" -print -quit)
            [[ -n $deb ]] || { rm -rf "$tmp"; dmabufd_kernel_die "downloaded $p .deb not found"; return 1; }
            dmabufd_kernel_log "extracting $(basename "$deb")"
            dpkg-deb -x "$deb" "$tmp/root" ||
                { rm -rf "$tmp"; dmabufd_kernel_die "dpkg-deb -x $deb failed"; return 1; }
        done
        # Newer packages may ship modules under usr/lib/modules only.
        if [[ ! -d $tmp/root/lib/modules/$rel && -d $tmp/root/usr/lib/modules/$rel ]]; then
            mkdir -p "$tmp/root/lib"
            ln -s ../usr/lib/modules "$tmp/root/lib/modules"
        fi
        if [[ -z $(dmabufd_kernel_image_in "$tmp/root" "$rel") || ! -d $tmp/root/lib/modules/$rel ]]; then
            rm -rf "$tmp"
            dmabufd_kernel_die "${pkgs[*]} do not contain a vmlinuz and lib/modules/$rel"
            return 1
        fi
        dmabufd_kernel_log "running depmod for $rel"
        "$depmod" -a -b "$tmp/root" "$rel" ||
            { rm -rf "$tmp"; dmabufd_kernel_die "depmod failed"; return 1; }
        printf '%s %s\n' "$pkg" "$ver" >"$tmp/package"
        touch "$tmp/.complete"
        rm -rf "${dir:?}/$rel"
        mv "$tmp" "$dir/$rel" || dmabufd_kernel_die "cannot move $tmp to $dir/$rel" || return 1
        rm -f "$apt/debs/"*.deb
    fi

    local cfg=$dir/$rel/root/boot/config-$rel opt
    [[ -f $cfg ]] || cfg=$dir/$rel/root/usr/lib/modules/$rel/config
    if [[ -f $cfg ]]; then
        for opt in CONFIG_UDMABUF=y CONFIG_DMABUF_HEAPS_SYSTEM=y CONFIG_DRM_VGEM=m; do
            grep -qx "$opt" "$cfg" || dmabufd_kernel_log "warning: $cfg lacks $opt"
        done
    fi

    printf '%s\n' "$rel" >"$dir/current.tmp.$$" &&
        mv "$dir/current.tmp.$$" "$dir/current" ||
        dmabufd_kernel_die "cannot write $dir/current" || return 1
}

# The CMA kernel: the shared prebuilt image when its checksum matches, else the
# cached build of scripts/build-kernel, else build it now.
# True when the prebuilt CMA image beside the checkout is there and matches
# its line in SHA256SUMS.
dmabufd_kernel_cma_prebuilt_ok() {
    local shared=$DMABUFD_CMA_SHARED_DIR img=vmlinuz-$DMABUFD_CMA_RELEASE
    [[ -f $shared/$img && -f $shared/SHA256SUMS ]] || return 1
    (cd "$shared" && grep -E "^[0-9a-f]{64}  $img\$" SHA256SUMS | sha256sum -c --quiet - >/dev/null 2>&1)
}

dmabufd_kernel_cma_ensure() {
    local refresh=$1 dir shared img
    dir=$(dmabufd_kernel_cache_dir)
    shared=$DMABUFD_CMA_SHARED_DIR
    img=vmlinuz-$DMABUFD_CMA_RELEASE
    DMABUFD_KERNEL_RELEASE=$DMABUFD_CMA_RELEASE
    DMABUFD_KERNEL_ROOT=
    if dmabufd_kernel_cma_prebuilt_ok; then
        DMABUFD_KERNEL_IMAGE=$(cd "$shared" && pwd -P)/$img
        DMABUFD_KERNEL_PACKAGE="prebuilt $img (SHA256SUMS ok)"
        return 0
    fi
    [[ -f $shared/$img ]] && dmabufd_kernel_log "warning: $shared/$img does not match its SHA256SUMS; not using it"
    if ((refresh)) || [[ ! -f $dir/.complete || ! -f $dir/vmlinuz ]]; then
        dmabufd_kernel_log "no usable prebuilt CMA kernel in $shared; building it with scripts/build-kernel: about 20 minutes on 2 cores"
        "$dmabufd_kernel_lib_dir/../build-kernel" $( ((refresh)) && echo --force) >&2 ||
            dmabufd_kernel_die "scripts/build-kernel failed" || return 1
    fi
    DMABUFD_KERNEL_IMAGE=$dir/vmlinuz
    DMABUFD_KERNEL_RELEASE=$(cat "$dir/release" 2>/dev/null || echo "$DMABUFD_CMA_RELEASE")
    DMABUFD_KERNEL_PACKAGE="built by scripts/build-kernel from $(cat "$dir/package" 2>/dev/null || echo '?')"
}

dmabufd_kernel_ensure() {
    local refresh=0 dir rel lockfd rc=0 name=${DMABUFD_KERNEL:-6.12}
    while [[ $# -gt 0 ]]; do
        case $1 in
            --refresh) refresh=1; shift ;;
            --kernel) name=${2:-}; shift 2 || shift ;;
            *) dmabufd_kernel_die "dmabufd_kernel_ensure: unknown argument $1"; return 1 ;;
        esac
    done
    dmabufd_kernel_select "$name" || return 1
    if [[ $name == 7.3-cma ]]; then
        dmabufd_kernel_cma_ensure "$refresh"
        return
    fi
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
