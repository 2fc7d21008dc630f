#!/usr/bin/env bash
# Builds kube-apiserver + kube-controller-manager from Debian's `kubernetes` source package
# with Debian's Go, offline (vendored modules), and caches them in
# ${RUNBOOKS_KUBE_CACHE:-~/.cache/runbooks-kube}/<source version>/bin. Reuses the cache when present.
#
# Leaves the system's apt configuration alone: deb-src lines go into a private sources list
# that mirrors the configured `deb` lines (one-line *.list files and deb822 *.sources files).
#
# Exit 0 only when both binaries exist afterwards. Any reason it cannot build is printed as
# "build-kube: cannot build: ..." and exits non-zero: it never passes by skipping.
set -euo pipefail

CACHE_ROOT="${RUNBOOKS_KUBE_CACHE:-${HOME}/.cache/runbooks-kube}"
TARGETS=(kube-apiserver kube-controller-manager)
APT_DIR="${CACHE_ROOT}/apt"

log() { printf 'build-kube: %s\n' "$*" >&2; }
die() {
    printf 'build-kube: cannot build: %s\n' "$*" >&2
    exit 1
}

APT_ETC="${RUNBOOKS_APT_ETC:-/etc/apt}" # tests point this at sample files

mirror_one_line_file() {
    # "deb [opts] uri suite comp..." -> "deb-src [opts] uri suite comp..."
    sed -n -E 's/^[[:space:]]*deb([[:space:]]+)/deb-src\1/p' "$1"
}

mirror_deb822_file() {
    # Each enabled stanza whose Types include `deb` becomes one-line deb-src entries.
    # Continuation lines (an inline Signed-By key) are skipped; only a keyring path is kept.
    awk '
        function flush(   i, j, nS, nU, S, U, opts) {
            if (types ~ /(^|[[:space:]])deb([[:space:]]|$)/ && enabled != "no" && uris != "" && suites != "") {
                opts = ""
                if (signed ~ /^\//) opts = "signed-by=" signed
                nU = split(uris, U, /[[:space:]]+/)
                nS = split(suites, S, /[[:space:]]+/)
                for (i = 1; i <= nU; i++) for (j = 1; j <= nS; j++) {
                    if (U[i] == "" || S[j] == "") continue
                    printf "deb-src %s%s %s %s\n", (opts != "" ? "[" opts "] " : ""), U[i], S[j], comps
                }
            }
            types = uris = suites = comps = signed = enabled = ""
        }
        /^[[:space:]]*#/ { next }
        /^[[:space:]]*$/ { flush(); next }
        /^[[:space:]]/ { next }
        {
            line = $0
            key = tolower(line); sub(/:.*/, "", key)
            val = line; sub(/^[^:]*:[[:space:]]*/, "", val); sub(/[[:space:]]+$/, "", val)
            if (key == "types") types = val
            else if (key == "uris") uris = val
            else if (key == "suites") suites = val
            else if (key == "components") comps = val
            else if (key == "signed-by") signed = val
            else if (key == "enabled") enabled = tolower(val)
        }
        END { flush() }
    ' "$1"
}

mirror_sources() {
    local f
    [[ -f "${APT_ETC}/sources.list" ]] && mirror_one_line_file "${APT_ETC}/sources.list"
    shopt -s nullglob
    for f in "${APT_ETC}"/sources.list.d/*.list; do mirror_one_line_file "$f"; done
    for f in "${APT_ETC}"/sources.list.d/*.sources; do mirror_deb822_file "$f"; done
    shopt -u nullglob
}

if [[ "${1:-}" == --print-sources ]]; then
    # What the private deb-src list would hold; no root, network or cache needed.
    mirror_sources
    exit 0
fi

mkdir -p "${CACHE_ROOT}"
# One build per machine at a time (a session and .ci/run may both ask for it).
exec 9>"${CACHE_ROOT}/.lock"
if ! flock -n 9; then
    log "another build holds ${CACHE_ROOT}/.lock; waiting for it"
    flock 9
fi

cached_version() {
    # Newest cached version that has both binaries (the lexical sort is fine: one version).
    local d
    for d in "${CACHE_ROOT}"/*/; do
        d="${d%/}"
        [[ -x "${d}/bin/kube-apiserver" && -x "${d}/bin/kube-controller-manager" ]] && basename "$d"
    done | sort | tail -n 1
}

# Fast path: the cache already answers, no network or apt needed.
if [[ -z "${RUNBOOKS_KUBE_FORCE:-}" ]]; then
    have="$(cached_version || true)"
    if [[ -n "$have" ]]; then
        log "cached: ${CACHE_ROOT}/${have}/bin ($("${CACHE_ROOT}/${have}/bin/kube-apiserver" --version 2>/dev/null || echo '?'))"
        exit 0
    fi
fi

[[ "$(id -u)" == 0 ]] || die "not root: installing Go and build tools with apt-get needs root (run as root or build once as root)"
command -v apt-get >/dev/null || die "apt-get not found: this recipe needs a Debian system"

# --- private apt config with deb-src lines ------------------------------------------------
mkdir -p "${APT_DIR}/lists/partial" "${APT_DIR}/cache/archives/partial"
SRC_LIST="${APT_DIR}/sources.list"
mirror_sources >"${SRC_LIST}"
[[ -s "${SRC_LIST}" ]] || die "no enabled 'deb' lines in ${APT_ETC}/sources.list or ${APT_ETC}/sources.list.d/*.{list,sources} to mirror as deb-src"

log "private deb-src list (${SRC_LIST}):"
sed 's/^/    /' "${SRC_LIST}" >&2

APT_OPTS=(
    -o "Dir::Etc::sourcelist=${SRC_LIST}"
    -o "Dir::Etc::sourceparts=-"
    -o "Dir::State::Lists=${APT_DIR}/lists"
    -o "Dir::Cache=${APT_DIR}/cache"
    -o "APT::Get::List-Cleanup=0"
    # Our private dirs live under $HOME, which the _apt sandbox user cannot write.
    -o "APT::Sandbox::User=root"
)
log "apt-get update (private lists)"
apt-get "${APT_OPTS[@]}" update -qq || die "apt-get update with the private deb-src list failed (no network or mirror down?)"

VERSION="$(apt-cache "${APT_OPTS[@]}" showsrc kubernetes 2>/dev/null | awk '/^Version:/ {print $2}' | sort -V | tail -n 1)"
[[ -n "${VERSION}" ]] || die "the configured suites ($(awk '{print $3}' "${SRC_LIST}" | sort -u | tr '\n' ' ')) have no 'kubernetes' source package; Debian 12 (bookworm) has 1.20.2, later releases may not: add a bookworm deb line or build on Debian 12"
SAFE_VERSION="${VERSION//[:~]/_}"
DEST="${CACHE_ROOT}/${SAFE_VERSION}"
if [[ -z "${RUNBOOKS_KUBE_FORCE:-}" && -x "${DEST}/bin/kube-apiserver" && -x "${DEST}/bin/kube-controller-manager" ]]; then
    log "cached: ${DEST}/bin"
    exit 0
fi
log "kubernetes source version ${VERSION}"

# --- Go and build tools -------------------------------------------------------------------
# The source's go.mod decides the minimum; Debian 12 builds 1.20.x with golang-1.19-go.
pick_go() {
    local cand
    # Preferred: the Go 1.20.x was released with (and Debian 12 built it with). Newer Go is a
    # last resort (its linker may reject 1.20's vendored code: then make fails, and says so).
    for cand in golang-1.19-go golang-1.20-go golang-1.21-go golang-1.18-go golang-1.17-go \
        golang-1.16-go golang-1.15-go golang-1.22-go golang-1.23-go golang-1.24-go golang-go; do
        if [[ -n "$(apt-cache policy "$cand" 2>/dev/null | awk '/Candidate:/ && $2 != "(none)" {print $2}')" ]]; then
            echo "$cand"
            return
        fi
    done
}
GO_PKG="$(pick_go)"
if [[ -z "${GO_PKG}" ]]; then
    # A fresh machine may never have run apt-get update.
    apt-get update -qq || die "apt-get update failed (no network or mirror down?)"
    GO_PKG="$(pick_go)"
fi
[[ -n "${GO_PKG}" ]] || die "no Go package in apt (tried golang-1.15-go..golang-1.24-go and golang-go); kubernetes ${VERSION} needs Go >= 1.15"
NEED=("${GO_PKG}" rsync make gcc libc6-dev dpkg-dev git)
missing=()
for p in "${NEED[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } ||
        die "apt-get install ${missing[*]} failed"
fi
if [[ "${GO_PKG}" == golang-go ]]; then
    GOROOT_DIR=/usr/lib/go
    log "warning: no versioned golang-1.NN-go package; trying the distro default Go"
else
    GOROOT_DIR="/usr/lib/go-${GO_PKG#golang-}"
    GOROOT_DIR="${GOROOT_DIR%-go}"
fi
[[ -x "${GOROOT_DIR}/bin/go" ]] || die "${GO_PKG} installed but ${GOROOT_DIR}/bin/go is missing"

# --- source ---------------------------------------------------------------------------------
WORK="${CACHE_ROOT}/work-${SAFE_VERSION}"
rm -rf "${WORK}"
mkdir -p "${WORK}"
cd "${WORK}"
log "apt-get source --download-only kubernetes=${VERSION}"
apt-get "${APT_OPTS[@]}" source --download-only "kubernetes=${VERSION}" >/dev/null ||
    die "apt-get source --download-only kubernetes=${VERSION} failed"
DSC="$(ls ./*.dsc | head -n 1)"
[[ -n "${DSC}" ]] || die "no .dsc downloaded"
dpkg-source --no-check -x "${DSC}" src >/dev/null || die "dpkg-source -x ${DSC} failed"
cd src
[[ -d vendor ]] || die "the source package has no vendor/ directory: an offline -mod=vendor build is impossible"

# --- build ----------------------------------------------------------------------------------
export PATH="${GOROOT_DIR}/bin:${PATH}"
export GOPROXY=off GOFLAGS=-mod=vendor GO111MODULE=on GOTOOLCHAIN=local
export GOCACHE="${CACHE_ROOT}/go-build" GOPATH="${WORK}/gopath"
# kube's build scripts want a version; the tarball has no .git.
UPSTREAM="${VERSION#*:}"
UPSTREAM="${UPSTREAM##*+really}" # 1.20.5+really1.20.2-1.1 is upstream 1.20.2
export KUBE_GIT_VERSION="v${UPSTREAM%%[-+~]*}" KUBE_GIT_TREE_STATE=clean KUBE_GIT_COMMIT=debian-source
log "building with $(go version) (log: ${WORK}/make.log)"
start=$(date +%s)
if ! make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >"${WORK}/make.log" 2>&1; then
    tail -n 40 "${WORK}/make.log" >&2
    die "make failed with $(go version); full log in ${WORK}/make.log"
fi
log "built in $(($(date +%s) - start)) s"

mkdir -p "${DEST}/bin"
for t in "${TARGETS[@]}"; do
    bin="$(find _output -type f -name "$t" -perm -u+x | head -n 1)"
    [[ -n "$bin" ]] || die "make succeeded but _output has no $t"
    install -m 0755 "$bin" "${DEST}/bin/$t.tmp"
    mv "${DEST}/bin/$t.tmp" "${DEST}/bin/$t"
done
"${DEST}/bin/kube-apiserver" --version >&2 || die "built kube-apiserver does not run"
cd /
rm -rf "${WORK}"
log "cached: ${DEST}/bin"
