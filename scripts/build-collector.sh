#!/usr/bin/env bash
# Builds this project's OpenTelemetry Collector distribution from source and prints the path of
# the binary (the only line on stdout; progress goes to stderr):
#
#   bash scripts/build-collector.sh            # -> .../otelcol-sqlalchemy-pool
#   "$(bash scripts/build-collector.sh)" validate --config=collector-config/otelcol.yaml
#
# What is built: collector-config/builder-config.yaml, an OpenTelemetry Collector Builder (ocb)
# manifest naming exactly the components of collector-config/otelcol*.yaml, all at one collector
# release. Module checksums are pinned by collector-config/builder-config.go.sum, so the build is
# verified without a checksum-database lookup (`--update-sums` rewrites that file after a
# manifest change; where sum.golang.org cannot be reached, run it with GOSUMDB=off and review
# the new checksums).
#
# Needs Go >= 1.25 (`go` on PATH, or /usr/local/go/bin/go, or GO=/path/to/go) and the Go module
# proxy. The first build takes minutes (a few on a fast machine, ~10 on 2 busy cores); the binary
# is cached under ${OTELCOL_CACHE_DIR:-~/.cache/otelcol-sqlalchemy-pool}, keyed by the manifest,
# the checksums and the Go version, so a second run takes well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."

manifest=collector-config/builder-config.yaml
sums=collector-config/builder-config.go.sum
update_sums=false
case "${1:-}" in
  "") ;;
  --update-sums) update_sums=true ;;
  *) echo "usage: $0 [--update-sums]" >&2; exit 2 ;;
esac

GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
if ! "$GO" version >/dev/null 2>&1; then
  echo "build-collector: Go not found (install Go >= 1.25 or set GO=/path/to/go)" >&2
  exit 2
fi
export PATH="$(dirname "$GO"):$PATH"
export GOTOOLCHAIN=local  # build with the Go that is installed, never download another

# The builder's version is the collector release every module of the manifest uses.
release=$(sed -n 's#^ *- gomod: go\.opentelemetry\.io/collector/receiver/otlpreceiver \(v[0-9.]*\)$#\1#p' "$manifest")
[ -n "$release" ] || { echo "build-collector: no otlpreceiver version in $manifest" >&2; exit 2; }
name=$(sed -n 's/^ *name: *//p' "$manifest" | head -1)

cache=${OTELCOL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/otelcol-sqlalchemy-pool}
key=$({ cat "$manifest"; cat "$sums" 2>/dev/null || true; "$GO" version; } | sha256sum | cut -c1-16)
binary="$cache/$key/$name"
if [ -x "$binary" ] && ! $update_sums; then
  echo "$binary"
  exit 0
fi

builder="$cache/bin/builder-$release"
if [ ! -x "$builder" ]; then
  echo "== installing the OpenTelemetry Collector Builder $release" >&2
  mkdir -p "$cache/bin"
  GOBIN="$cache/bin" "$GO" install "go.opentelemetry.io/collector/cmd/builder@$release" >&2
  mv "$cache/bin/builder" "$builder"
fi

work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
# The manifest's output_path is relative: build in the scratch directory.
cp "$manifest" "$work/builder-config.yaml"
out="$work/$(sed -n 's#^ *output_path: *\./##p' "$manifest")"
mkdir -p "$out"
if ! $update_sums && [ -f "$sums" ]; then
  # Go checks every module against these checksums and asks the checksum database only for
  # modules missing from them (none, unless the manifest changed without --update-sums).
  cp "$sums" "$out/go.sum"
fi
echo "== building $name (collector $release) with $("$GO" version); the first build takes minutes" >&2
start=$SECONDS
(cd "$work" && "$builder" --config builder-config.yaml >&2)
if $update_sums; then
  cp "$out/go.sum" "$sums"
  echo "== wrote $sums" >&2
  key=$({ cat "$manifest"; cat "$sums"; "$GO" version; } | sha256sum | cut -c1-16)
  binary="$cache/$key/$name"
fi
mkdir -p "$(dirname "$binary")"
mv "$out/$name" "$binary.tmp"
mv "$binary.tmp" "$binary"
echo "== built in $((SECONDS - start)) s: $binary" >&2
echo "$binary"
