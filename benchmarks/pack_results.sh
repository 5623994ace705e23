#!/usr/bin/env bash
# PACK=1 for gpu_check.sh and tp_check.sh: device calls bring back only a few files, so everything in
# OUT but the summary and the bench table goes into one OUT/results.tgz beside them.
#
#   bash benchmarks/pack_results.sh OUT SUMMARY_FILE_NAME
set -eu
out=$1 summary=$2
pack=$(mktemp -d)/results.tgz
tar czf "$pack" -C "$out" .
find "$out" -mindepth 1 -not -name "$summary" -not -name bench_table.md -delete
mv "$pack" "$out/"
