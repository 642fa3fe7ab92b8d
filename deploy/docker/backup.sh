#!/bin/sh
# The backup image's job (deploy/k8s/components/backup): a consistent snapshot of the durable state
# (python -m tools.backup create), verified, into $SOPHIA_BACKUP_DIR/<UTC time>; then only the newest
# $SOPHIA_BACKUP_KEEP verified snapshots are kept. A snapshot that fails to verify is removed and the
# job fails, so a bad one never displaces a good one.
set -eu
root="${SOPHIA_BACKUP_DIR:-/backups}"
keep="${SOPHIA_BACKUP_KEEP:-14}"
snapshot="$root/$(date -u +%Y%m%dT%H%M%SZ)"
python -m tools.backup create "$snapshot"
if ! python -m tools.backup verify "$snapshot"; then
  rm -rf "$snapshot"
  exit 1
fi
# Snapshot names sort by time; drop all but the newest $keep.
find "$root" -mindepth 1 -maxdepth 1 -type d -name '2*Z' | sort | head -n "-$keep" | while read -r old; do
  rm -rf "$old"
  echo "removed $old"
done
