#!/usr/bin/env bash
# Send files larger than the device tool's working-tree limit (64 MiB a call) to a lent GPU machine,
# in parts, over back-to-back calls. A warm machine keeps the ignored files of earlier calls (it is
# given back after 30 s idle), so each call carries one part in the ignored folder .gpu_carry/ and
# the last call joins them. Checked by sha256; nothing is trusted half-sent.
#
# Here:
#   bash scripts/gpu_carry.sh pack NAME PATH...    # tar PATH... into .gpu_carry/NAME.tar.partNN (55 MiB
#                                                  # each) + NAME.sha256; prints the calls to make
# There (each call's command; carry [".gpu_carry/NAME.tar.partNN", ".gpu_carry/NAME.sha256"]):
#   bash scripts/gpu_carry.sh have NAME            # which parts are there so far
#   bash scripts/gpu_carry.sh unpack NAME DEST     # all parts there: join, check, untar into DEST
#
# Example (the fastkd asset cache for DFKD-T3 on a GPU: MiniLM, SmolLM2, WordNet, movie reviews):
#   bash scripts/gpu_carry.sh pack assets ~/.cache/fastkd
#   ... calls 1..K-1: `bash scripts/gpu_carry.sh have assets`
#   ... call K:       `bash scripts/gpu_carry.sh unpack assets /tmp/fastkd-cache && FASTKD_CACHE=/tmp/fastkd-cache ...`
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.gpu_carry
PART=${GPU_CARRY_PART:-55M}
usage() { sed -n '2,17p' "$0"; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1 name=$2
shift 2
case "$cmd" in
  pack)
    [ $# -ge 1 ] || usage
    mkdir -p "$DIR"
    rm -f "$DIR/$name".tar.part* "$DIR/$name.sha256"
    # -h: follow links (a pip cache or a venv may link the big files); paths stored relative to each parent
    args=()
    for p in "$@"; do
      [ -e "$p" ] || { echo "gpu_carry: no such path: $p" >&2; exit 2; }
      args+=(-C "$(dirname "$(realpath "$p")")" "$(basename "$(realpath "$p")")")
    done
    tar -ch "${args[@]}" | split -b "$PART" -d -a 2 - "$DIR/$name.tar.part"
    cat "$DIR/$name".tar.part* | sha256sum | cut -d' ' -f1 >"$DIR/$name.sha256"
    n=$(ls "$DIR/$name".tar.part* | wc -l)
    echo "gpu_carry: $name: $(du -ch "$DIR/$name".tar.part* | tail -1 | cut -f1) in $n part(s) of at most $PART, sha256 $(cat "$DIR/$name.sha256")"
    i=0
    for f in "$DIR/$name".tar.part*; do
      i=$((i + 1))
      what="bash scripts/gpu_carry.sh have $name"
      [ $i = "$n" ] && what="bash scripts/gpu_carry.sh unpack $name DEST && ..."
      echo "  call $i/$n: carry [\"$f\", \"$DIR/$name.sha256\"], command: $what"
    done
    ;;
  have)
    ls -l "$DIR/$name".tar.part* 2>/dev/null || echo "gpu_carry: no part of $name here"
    ;;
  unpack)
    [ $# -eq 1 ] || usage
    dest=$1
    [ -f "$DIR/$name.sha256" ] || { echo "gpu_carry: $DIR/$name.sha256 missing" >&2; exit 1; }
    got=$(cat "$DIR/$name".tar.part* | sha256sum | cut -d' ' -f1)
    if [ "$got" != "$(cat "$DIR/$name.sha256")" ]; then
      echo "gpu_carry: $name: parts there ($(ls "$DIR/$name".tar.part* | wc -l)) do not make the packed tar (sha256 $got)" >&2
      exit 1
    fi
    mkdir -p "$dest"
    cat "$DIR/$name".tar.part* | tar -x -C "$dest"
    echo "gpu_carry: $name unpacked into $dest ($(du -sh "$dest" | cut -f1))"
    ;;
  *) usage ;;
esac
