#!/bin/sh
# Installs libsysgenid from the cargo target directory into PREFIX:
#   PREFIX/include/sysgenid.h
#   PREFIX/lib/libsysgenid.so.0.1.0, libsysgenid.so.0 -> , libsysgenid.so ->
#   PREFIX/lib/libsysgenid.a
#   PREFIX/lib/pkgconfig/sysgenid.pc
#
# usage: crates/libsysgenid/install.sh PREFIX [PROFILE_DIR]
#   PROFILE_DIR: where cargo put the libraries (default: target/release of
#   this workspace; build it with `cargo build --release -p sysgenid-c`).
#   DESTDIR is honoured as usual for packaging.
set -eu

if [ $# -lt 1 ]; then
	echo "usage: $0 PREFIX [PROFILE_DIR]" >&2
	exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
prefix=$1
profile_dir=${2:-$root/target/release}
destdir=${DESTDIR:-}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n 1)
major=${version%%.*}

for f in libsysgenid.so libsysgenid.a; do
	if [ ! -f "$profile_dir/$f" ]; then
		echo "$0: $profile_dir/$f missing: run \`cargo build --release -p sysgenid-c\` first" >&2
		exit 1
	fi
done

lib=$destdir$prefix/lib
inc=$destdir$prefix/include
pc=$lib/pkgconfig
mkdir -p "$lib" "$inc" "$pc"
install -m 0644 "$root/include/sysgenid.h" "$inc/sysgenid.h"
install -m 0755 "$profile_dir/libsysgenid.so" "$lib/libsysgenid.so.$version"
ln -sf "libsysgenid.so.$version" "$lib/libsysgenid.so.$major"
ln -sf "libsysgenid.so.$major" "$lib/libsysgenid.so"
install -m 0644 "$profile_dir/libsysgenid.a" "$lib/libsysgenid.a"
sed -e "s|@PREFIX@|$prefix|g" -e "s|@VERSION@|$version|g" \
	"$here/sysgenid.pc.in" >"$pc/sysgenid.pc"
echo "installed libsysgenid $version into $destdir$prefix"
