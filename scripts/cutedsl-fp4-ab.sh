#!/usr/bin/env bash
# A/B of cutedsl_fp4 builds on one GPU machine call.
#
# Here (a machine with Rust, no GPU needed), one variant per git ref:
#   scripts/cutedsl-fp4-ab.sh build main gpu-pending/fp4-item-claims ...
# builds each ref's `cutedsl-fp4` example and its GPU test binaries (gpu_fp4, gpu_deepep) in a
# detached worktree, sharing one target directory, and stages them stripped under
# .device/ab/<ref with / as ->/ (about 7.5 MB a variant; carry `.device` with the call).
#
# There (the GPU machine, from the project root):
#   bash scripts/cutedsl-fp4-ab.sh test
#       each variant's gpu_fp4 and gpu_deepep (one GPU), their last lines;
#   bash scripts/cutedsl-fp4-ab.sh ncu ROWS[,ROWS...] [ROUNDS] [KERNEL_REGEX]
#       Nsight Compute kernel times (us, --clock-control none) of each variant's timed passes at
#       each batch size, variants alternating within a round: per kernel, the median of its
#       even and of its odd launches (GEMM 1 and GEMM 2 where both take one instantiation);
#       whole passes vary by more than most changes, kernel times much less. With CACHE=none
#       in the environment, the caches are not flushed between kernels (--cache-control none),
#       as in a pass: a kernel that reads what the one before it wrote then gets its L2 hits;
#   bash scripts/cutedsl-fp4-ab.sh pass ROWS[,ROWS...] [ROUNDS]
#       the example's table of whole passes, variants alternating within a round;
#   bash scripts/cutedsl-fp4-ab.sh sections ROWS [KERNEL_REGEX] [SKIP] [COUNT]
#       where a kernel's time goes: Nsight Compute's speed-of-light, memory, warp-state and
#       scheduler sections of COUNT (2) launches matching KERNEL_REGEX (^fp4_wgmma) after SKIP
#       (0) at ROWS rows per expert, each variant; a metric a line (the example's launches run
#       exact products first, then E4M3 ones, 24 passes each a layout);
#   bash scripts/cutedsl-fp4-ab.sh sanitize VARIANT [TEST_FILTER...]
#       compute-sanitizer's memcheck over the variant's gpu_fp4 tests (those matching a filter, or
#       all), then racecheck and synccheck over the filtered ones (or five that reach every item
#       size, E4M3 products, the masked layout, ring reuse and items taller than their rows).
set -euo pipefail
root=$(git rev-parse --show-toplevel 2>/dev/null || pwd)
cd "$root"
ab=.device/ab
mode=${1:-}
shift || true

variants() { find "$ab" -mindepth 1 -maxdepth 1 -type d | sort; }

case "$mode" in
build)
    [ $# -gt 0 ] || { echo "usage: $0 build REF..." >&2; exit 2; }
    export CARGO_TARGET_DIR="$root/target/ab"
    mkdir -p "$ab"
    for ref in "$@"; do
        name=${ref//\//-}
        wt=$(mktemp -d)
        git worktree add -q --detach "$wt" "$ref"
        (
            cd "$wt"
            cargo build -q --release -p moe-examples --features cuda --bin cutedsl-fp4
            cargo test -q --release -p moe-conformance --features cuda --test gpu_fp4 --test gpu_deepep \
                --no-run --message-format=json 2>/dev/null \
                | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])' >"$wt/tests.txt"
        )
        rm -rf "${ab:?}/$name"
        mkdir -p "$ab/$name"
        cp "$CARGO_TARGET_DIR/release/cutedsl-fp4" "$ab/$name/"
        while read -r t exe; do cp "$exe" "$ab/$name/$t"; done <"$wt/tests.txt"
        strip "$ab/$name"/*
        git worktree remove --force "$wt"
        echo "$name: $(git rev-parse --short "$ref") -> $ab/$name ($(du -sh "$ab/$name" | cut -f1))"
    done
    ;;
test)
    for v in $(variants); do
        echo "== $(basename "$v")"
        "$v/gpu_fp4" --include-ignored --test-threads=1 2>&1 | grep -E "^test result|FAILED|panicked" || true
        MOE_TEST_MAX_RANKS=1 "$v/gpu_deepep" --include-ignored --test-threads=1 2>&1 \
            | grep -E "^test result|FAILED|panicked" || true
    done
    ;;
ncu)
    # Per kernel name: launches, then the median of its even and of its odd launches in order
    # (GEMM 1 and GEMM 2 where both take that instantiation), in us.
    summary='
import csv, statistics, sys
t = {}
for row in csv.reader(l for l in sys.stdin if l.startswith(chr(34))):
    if len(row) > 5 and row[-3] == "gpu__time_duration.sum":
        t.setdefault(row[4].split("(")[0], []).append(float(row[-1].replace(",", "")) / 1e3)
for k, v in sorted(t.items()):
    med = lambda x: statistics.median(x) if x else float("nan")
    print(f"  {k:24} n={len(v):3}  even {med(v[0::2]):8.1f}  odd {med(v[1::2]):8.1f}  min {min(v):8.1f}")
'
    rows=${1:?ROWS}
    rounds=${2:-2}
    regex=${3:-^fp4_(wgmma|gemm_n)}
    for r in ${rows//,/ }; do
        for round in $(seq "$rounds"); do
            for v in $(variants); do
                echo "== rows $r, round $round, $(basename "$v")"
                ncu --clock-control none --cache-control "${CACHE:-all}" --kernel-name "regex:$regex" \
                    --metrics gpu__time_duration.sum \
                    --csv --print-units base "$v/cutedsl-fp4" --time-only "$r" 2>/dev/null | python3 -c "$summary"
            done
        done
    done
    ;;
pass)
    rows=${1:?ROWS}
    rounds=${2:-2}
    for round in $(seq "$rounds"); do
        for v in $(variants); do
            echo "== round $round, $(basename "$v")"
            "$v/cutedsl-fp4" --time-only "$rows" 2>&1 | grep -E "^\| (masked|standard)"
        done
    done
    ;;
sections)
    rows=${1:?ROWS}
    regex=${2:-^fp4_wgmma}
    skip=${3:-0}
    count=${4:-2}
    for v in $(variants); do
        echo "== rows $rows, $(basename "$v"), launches $skip.. $((skip + count - 1)) of $regex"
        ncu --clock-control none --kernel-name "regex:$regex" --launch-skip "$skip" --launch-count "$count" \
            --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
            --section SchedulerStats --csv --print-units base "$v/cutedsl-fp4" --time-only "$rows" 2>/dev/null \
            | python3 -c '
import csv, sys
# Columns by the header row: Nsight Compute 2025 adds rule columns after the metric value.
col = None
for row in csv.reader(l for l in sys.stdin if l.startswith(chr(34))):
    if row[0] == "ID":
        col = {name: i for i, name in enumerate(row)}
        continue
    if col and row[col["Metric Name"]]:
        kernel = row[col["Kernel Name"]].split(chr(40))[0]
        name, unit, value = (row[col[k]] for k in ("Metric Name", "Metric Unit", "Metric Value"))
        print("  %3s %-22s %-58s %-10s %s" % (row[0], kernel, name, unit, value))
'
    done
    ;;
sanitize)
    v="$ab/${1:?VARIANT}"
    shift
    t="$v/gpu_fp4 --include-ignored --test-threads=1"
    filters=("$@")
    [ ${#filters[@]} -gt 0 ] || filters=(every_item_size e4m3_products masked_layout long_k items_taller)
    echo "== memcheck"
    compute-sanitizer --tool memcheck --error-exitcode 9 $t "$@" 2>&1 | grep -E "ERROR SUMMARY|test result|FAILED" || true
    for tool in racecheck synccheck; do
        for f in "${filters[@]}"; do
            echo "== $tool $f"
            compute-sanitizer --tool "$tool" --error-exitcode 9 $t "$f" 2>&1 \
                | grep -E "ERROR SUMMARY|RACECHECK SUMMARY|test result|FAILED" || true
        done
    done
    ;;
*)
    sed -n '2,28p' "$0"
    exit 2
    ;;
esac
