"""Backups of the state that matters, taken while the mesh serves, and their restore.

    python -m tools.backup create DIR    a consistent, checksummed snapshot of the durable state
    python -m tools.backup verify DIR    checks a snapshot (checksums, and every entry restores) without
                                         touching the live Redis
    python -m tools.backup restore DIR   writes a snapshot into an empty Redis

What is kept: the ledger (usage records and their idempotency bindings, spend aggregates, budgets and
alerts), the API keys created through the admin API (hashes only: no secret is ever stored), the
Gateway's idempotency keys (so a request retried after a restore is still counted once) and the audit
log. Not kept, because they rebuild themselves: cache entries, rate-limit windows, provider health.

Consistency: the live Redis is asked for a point-in-time copy of its whole dataset (`redis-cli --rdb`, the
replication snapshot, taken by a fork, so the mesh keeps serving and no write is half in). That copy is
loaded into a throwaway `redis-server`, and the kept keys are read from there (DUMP with their remaining
time to live), so the snapshot is exactly the state at one instant: a usage record and the aggregates it
updated are both in or both out. The copy is deleted afterwards (it holds the cache too).

A snapshot is a directory: `entries.jsonl` (one key per line: name, remaining TTL, DUMP payload, SHA-256
of the payload) and `manifest.json` (when, the source's Redis version, counts per kind, the SHA-256 of
`entries.jsonl`). DUMP payloads restore into the same or a newer Redis version.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import redis

from libs.config import ConfigError, load_config
from tools.ports import free_port

FORMAT = "sophia-backup/1"
ENTRIES = "entries.jsonl"
MANIFEST = "manifest.json"
# Key patterns of the durable state, by kind (see each owner: services/ledger/store.py,
# services/gateway/access/key_store.py, services/gateway/serving/idempotency.py, the audit log).
KEPT = {
    "ledger": "ledger:*",
    "api_keys": "gateway:{apikeys}:*",
    "idempotency": "gateway:idempotency:*",
    "audit": "gateway:audit:*",
}
SCAN_BATCH = 1000
START_TIMEOUT_SECONDS = 30.0


class BackupError(Exception):
    """The backup or restore cannot go on; the message says why."""


@dataclass(frozen=True)
class Entry:
    key: bytes
    kind: str
    ttl_ms: int  # 0: no expiry
    payload: bytes

    def line(self) -> str:
        return json.dumps(
            {
                "key": base64.b64encode(self.key).decode(),
                "kind": self.kind,
                "ttl_ms": self.ttl_ms,
                "dump": base64.b64encode(self.payload).decode(),
                "sha256": hashlib.sha256(self.payload).hexdigest(),
            },
            separators=(",", ":"),
        )


def _kind_of(key: bytes) -> str:
    text = key.decode("utf-8", "replace")
    for kind, pattern in KEPT.items():
        if text.startswith(pattern.removesuffix("*")):
            return kind
    raise BackupError(f"key outside the kept patterns: {text[:80]!r}")


@contextlib.contextmanager
def _scratch_redis(rdb: Path | None = None) -> Iterator[redis.Redis]:
    """A throwaway redis-server on a free loopback port (loading `rdb` when given), never persisted."""
    directory = Path(tempfile.mkdtemp(prefix="sophia-backup-"))
    if rdb is not None:
        shutil.move(rdb, directory / "dump.rdb")
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
    # Never persisted: the copy is read, then thrown away.
    command += ["--dbfilename", "dump.rdb", "--save", "", "--appendonly", "no"]
    server = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_timeout=30)
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            try:
                if client.ping():
                    break
            except redis.exceptions.BusyLoadingError:
                pass
            except redis.exceptions.ConnectionError:
                if server.poll() is not None:
                    raise BackupError("the scratch redis-server exited at start-up") from None
            if time.monotonic() > deadline:
                raise BackupError("the scratch redis-server did not start")
            time.sleep(0.05)
        yield client
    finally:
        client.close()
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


def _point_in_time_copy(url: str, into: Path) -> None:
    """The live dataset as one RDB file, taken by the server's fork (replication snapshot)."""
    ran = subprocess.run(
        ["redis-cli", "-u", url, "--rdb", str(into)], capture_output=True, text=True, timeout=600
    )
    if ran.returncode != 0 or not into.exists():
        reason = (ran.stderr or ran.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BackupError(f"could not take a snapshot of {_shown_url(url)}: {reason[0]}")


def _shown_url(url: str) -> str:
    """The URL without a password, for messages."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


def _kept_entries(client: redis.Redis) -> Iterator[Entry]:
    for kind, pattern in KEPT.items():
        for key in sorted(set(client.scan_iter(match=pattern, count=SCAN_BATCH))):
            with client.pipeline(transaction=False) as pipe:
                pipe.dump(key)
                pipe.pttl(key)
                payload, ttl = pipe.execute()
            if payload is None:
                continue
            yield Entry(key, kind, max(int(ttl), 0), payload)


def create(directory: Path, url: str) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / MANIFEST).exists():
        raise BackupError(f"{directory} already holds a snapshot; choose an empty directory")
    live = redis.Redis.from_url(url, socket_timeout=30)
    try:
        version = live.info("server").get("redis_version", "unknown")
    except redis.exceptions.RedisError as exc:
        raise BackupError(f"cannot reach Redis at {_shown_url(url)}: {exc}") from None
    finally:
        live.close()
    taken_at = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="sophia-rdb-") as scratch:
        rdb = Path(scratch) / "copy.rdb"
        _point_in_time_copy(url, rdb)
        counts = dict.fromkeys(KEPT, 0)
        digest = hashlib.sha256()
        partial = directory / f"{ENTRIES}.partial"
        with _scratch_redis(rdb) as copy, partial.open("w", encoding="ascii") as out:
            for entry in _kept_entries(copy):
                line = entry.line() + "\n"
                out.write(line)
                digest.update(line.encode("ascii"))
                counts[entry.kind] += 1
        partial.rename(directory / ENTRIES)
    manifest = {
        "format": FORMAT,
        "taken_at": taken_at.isoformat(),
        "redis_version": version,
        "counts": counts,
        "entries_sha256": digest.hexdigest(),
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _read(directory: Path) -> tuple[dict, list[Entry]]:
    """The snapshot's entries after checking every checksum; BackupError names the first problem."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        raw = (directory / ENTRIES).read_bytes()
    except (OSError, ValueError) as exc:
        raise BackupError(f"{directory} is not a readable snapshot: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{directory}: unknown format {manifest.get('format')!r}")
    if hashlib.sha256(raw).hexdigest() != manifest.get("entries_sha256"):
        raise BackupError(f"{directory}/{ENTRIES}: checksum mismatch (the file was changed or cut short)")
    entries = []
    for number, line in enumerate(raw.decode("ascii").splitlines(), start=1):
        try:
            item = json.loads(line)
            entry = Entry(
                base64.b64decode(item["key"], validate=True),
                item["kind"],
                int(item["ttl_ms"]),
                base64.b64decode(item["dump"], validate=True),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise BackupError(f"{ENTRIES} line {number}: unreadable ({exc})") from None
        if hashlib.sha256(entry.payload).hexdigest() != item.get("sha256"):
            raise BackupError(f"{ENTRIES} line {number}: payload checksum mismatch")
        if entry.kind != _kind_of(entry.key):
            raise BackupError(f"{ENTRIES} line {number}: key does not belong to kind {entry.kind!r}")
        entries.append(entry)
    counted = {kind: sum(1 for e in entries if e.kind == kind) for kind in KEPT}
    if counted != {kind: manifest.get("counts", {}).get(kind, 0) for kind in KEPT}:
        raise BackupError(f"{directory}: entry counts differ from the manifest's")
    return manifest, entries


def _restore_into(client: redis.Redis, entries: list[Entry]) -> None:
    with client.pipeline(transaction=False) as pipe:
        for index, entry in enumerate(entries, start=1):
            pipe.restore(entry.key, entry.ttl_ms, entry.payload)
            if index % SCAN_BATCH == 0:
                pipe.execute()
        pipe.execute()


def verify(directory: Path) -> dict:
    """Checksums, then a real restore of every entry into a scratch Redis."""
    manifest, entries = _read(directory)
    with _scratch_redis() as scratch:
        try:
            _restore_into(scratch, entries)
        except redis.exceptions.ResponseError as exc:
            raise BackupError(f"an entry does not restore: {exc}") from None
        restored = scratch.dbsize()
    if restored != len(entries):
        raise BackupError(f"restored {restored} keys, expected {len(entries)}")
    return manifest


def restore(directory: Path, url: str) -> dict:
    manifest, entries = _read(directory)
    target = redis.Redis.from_url(url, socket_timeout=30)
    try:
        for kind, pattern in KEPT.items():
            if next(target.scan_iter(match=pattern, count=SCAN_BATCH), None) is not None:
                raise BackupError(
                    f"{_shown_url(url)} already holds {kind} data; restore only into a Redis without it"
                )
        _restore_into(target, entries)
    except redis.exceptions.RedisError as exc:
        raise BackupError(f"restore into {_shown_url(url)} failed: {exc}") from None
    finally:
        target.close()
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.backup", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["create", "verify", "restore"])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--redis-url", help="default: redis.url from the config ($SOPHIA_CONFIG)")
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            manifest = verify(args.directory)
        else:
            url = args.redis_url or load_config().redis.url
            action = create if args.command == "create" else restore
            manifest = action(args.directory, url)
    except (BackupError, ConfigError) as exc:
        print(f"backup: {exc}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{n} {kind}" for kind, n in manifest["counts"].items())
    print(f"{args.command}: {args.directory} (taken {manifest['taken_at']}): {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
