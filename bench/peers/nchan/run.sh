#!/bin/sh
# Runs the nchan peer in the foreground: bench/peers/nchan/run.sh PORT [DIR]
# DIR (default: a new temporary directory) holds the rendered nginx.conf, the pid file
# and error.log. The process becomes nginx's master (exec); its workers are its children.
set -eu
port=${1:?usage: run.sh PORT [DIR]}
dir=${2:-$(mktemp -d /tmp/nchan-peer.XXXXXX)}
module=${NCHAN_MODULE:-/usr/lib/nginx/modules/ngx_nchan_module.so}
workers=${NCHAN_WORKERS:-$(nproc)}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$dir"
sed -e "s|@PREFIX@|$dir|g" -e "s|@PORT@|$port|g" -e "s|@MODULE@|$module|g" -e "s|@WORKERS@|$workers|g" \
    "$here/nginx.conf.template" > "$dir/nginx.conf"
nginx -t -q -p "$dir" -c "$dir/nginx.conf"
echo "nchan (nginx) starting on 127.0.0.1:$port, prefix $dir"
exec nginx -p "$dir" -c "$dir/nginx.conf"
