#!/bin/sh
# Every export, table and figure of the capacity protocol, regenerated from its storage (capacity.db.gz):
# per study, results/capacity/<study>/ gets trials.csv / .parquet (every trial, every seed's value), claims.md /
# .csv (each claim's verdict; capacity_lr_edge's with capacity_lr_low's trials pooled), the figures, and report.txt (the printed table).
#   sh results/capacity/regenerate.sh        (from the repository root, momkit installed)
set -e
here=results/capacity
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
gunzip -c "$here/capacity.db.gz" > "$tmp/capacity.db"
studies=$(python -c "import optuna; print(' '.join(s.study_name for s in optuna.get_all_study_summaries('sqlite:///$tmp/capacity.db')))")
for study in $studies; do
  mkdir -p "$here/$study"
  # the learning-rate control's claims on its own grid and the lower rates of capacity_lr_low together
  pool=""
  [ "$study" = capacity_lr_edge ] && pool="--pool capacity_lr_low"
  python -m momkit sweep-report "$study" --storage "sqlite:///$tmp/capacity.db" --out "$here/$study" $pool \
    | sed "s#$tmp/##g" > "$here/$study/report.txt"
  echo "$here/$study: $(grep -c . "$here/$study/report.txt") lines of report"
done
