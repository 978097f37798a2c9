#!/bin/sh
# Assembles the root filesystem of a FROM-scratch image for one binary:
#
#   sh docker/rootfs.sh BINARY OUT
#
# OUT/usr/local/bin/NAME, exactly the shared libraries the binary links (as `ldd`
# resolves them, with the dynamic loader), CA certificates, and /etc/passwd and
# /etc/group naming the one non-root user (65532, "nonroot"). Nothing else: no shell,
# no package manager. The Dockerfiles' builder stage runs it; so does
# `cargo xtask build-images --prebuilt` on the host, where it stands in for that stage.
set -eu
# Readable by the image's user (65532) whatever the caller's umask.
umask 022

if [ "$#" -ne 2 ]; then
    echo "usage: $0 BINARY OUT" >&2
    exit 2
fi
binary=$1
out=$2

mkdir -p "$out/usr/local/bin" "$out/etc/ssl/certs"
cp "$binary" "$out/usr/local/bin/"

# `ldd` prints "libx.so => /path (addr)" for libraries and "/path (addr)" for the loader.
linked=$(ldd "$binary")
if echo "$linked" | grep -q 'not found'; then
    echo "$0: $binary needs libraries this system lacks:" >&2
    echo "$linked" | grep 'not found' >&2
    exit 1
fi
libraries=$(echo "$linked" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
if [ -z "$libraries" ]; then
    echo "$0: ldd found no libraries for $binary (static binaries need no rootfs.sh)" >&2
    exit 1
fi
for library in $libraries; do
    cp -L --parents "$library" "$out/"
done

cp /etc/ssl/certs/ca-certificates.crt "$out/etc/ssl/certs/"
echo 'nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin' >"$out/etc/passwd"
echo 'nonroot:x:65532:' >"$out/etc/group"
