"""Files of an evaluation run: atomic writes, configuration fingerprints, the per-sample JSONL, the environment.

- `write_json_atomic` / `write_lines_atomic`: temporary file in the same folder, fsync, `os.replace`.
- `fingerprint_of(config)`: a short hash of everything that changes the per-sample results; result files and JSONL
  headers carry it, and `check_result_file` / `SampleJournal.open` refuse files of another configuration.
- `SampleJournal`: the per-sample JSONL (header line + one line per sample, appended and fsync'd per sample).
- `environment_info`, `git_commit`, `cpu_name`: versions, device, CPU and git commit for result files.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import subprocess
from pathlib import Path
from typing import Iterable

import torch

FORMAT_VERSION = 1


class ConfigurationMismatch(RuntimeError):
    """An existing JSONL or result file belongs to a different configuration."""


def git_commit(path: Path | None = None) -> str | None:
    """The repository's commit (with `-dirty` when the tree has changes), or None outside a git checkout."""
    path = path or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=path, capture_output=True, text=True,
            timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "") if commit else None


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


BUSY_SAMPLE_S = 0.2  # how long the start of a CPU run samples the other processes' load


def busy_cores(seconds: float = 1.0) -> float | None:
    """How many cores other processes kept busy over `seconds` (from /proc/stat while this one sleeps; None where
    /proc/stat cannot be read)."""
    def sample():
        with open("/proc/stat", encoding="ascii") as handle:
            values = [int(x) for x in handle.readline().split()[1:]]
        return sum(values[:8]), values[3] + (values[4] if len(values) > 4 else 0)  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 == total0:
        return 0.0
    return round((1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1), 2)


def environment_info(device: str, device_label: str) -> dict:
    """Versions, device, git commit and, on a CPU, how many cores other processes kept busy at the start (the
    comparison warns about timings when that is high), for the result file."""
    import transformers

    from . import __version__

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fastv_advanced": __version__,
        "platform": platform.platform(),
        "device": device,
        "device_name": device_label,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "git_commit": git_commit(),
        "busy_cores": busy_cores(BUSY_SAMPLE_S) if torch.device(device).type == "cpu" else None,
    }
    try:
        import accelerate

        info["accelerate"] = accelerate.__version__
    except ImportError:
        pass
    return info


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """Write JSON to a temporary file in the same folder, fsync it, then `os.replace` it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_lines_atomic(path: Path, lines: Iterable[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        for line in lines:
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def fingerprint_of(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def differences(ours: dict, theirs: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(ours) | set(theirs)):
        a, b = ours.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {b!r} there, {a!r} now")
    return diffs


def _mismatch_message(path: Path, ours: dict, theirs: dict | None, what: str) -> str:
    detail = "; ".join(differences(ours, theirs)[:6]) if isinstance(theirs, dict) else "it has no fingerprint"
    return (
        f"{path} holds {what} of a different configuration ({detail}). Refusing to mix or overwrite it: pass "
        "--overwrite to replace it, or --output-dir to write elsewhere."
    )


def check_result_file(path: Path, config: dict, overwrite: bool) -> None:
    """Refuse (ConfigurationMismatch) when `path` exists and is not a result of the same configuration."""
    if overwrite or not path.exists():
        return
    try:
        existing = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        existing = None
    if not isinstance(existing, dict) or existing.get("fingerprint") != fingerprint_of(config):
        theirs = existing.get("fingerprint_config") if isinstance(existing, dict) else None
        raise ConfigurationMismatch(_mismatch_message(path, config, theirs, "a result"))


class SampleJournal:
    """The per-sample JSONL: a header line (fingerprint, configuration, selection), then one line per sample.

    Lines are appended, flushed and fsync'd one sample at a time, so a kill loses at most the sample in flight; a
    torn last line is dropped on the next open. The last record of an id wins (failed samples are retried).
    """

    def __init__(self, path: Path, header: dict, records: dict[str, dict]):
        self.path = path
        self.header = header
        self.records = records

    @staticmethod
    def read(path: Path) -> tuple[dict, dict[str, dict]]:
        """(header, records by id) of a JSONL; a torn last line is ignored; any other bad line raises."""
        with open(path, "rb") as handle:
            raw = handle.read()
        # The part after the last newline, if any, is the sample in flight when a run was killed: dropped.
        complete = raw.split(b"\n")[:-1]
        if not complete:
            raise ValueError(f"{path} has no header line")
        header, records = None, {}
        for number, line in enumerate(complete, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number} is not valid JSON ({exc}); fix or delete the file") from exc
            if header is None:
                if not isinstance(item, dict) or item.get("type") != "header":
                    raise ValueError(f"{path}:{number} is not a fastv_advanced sample-file header")
                header = item
            elif not isinstance(item, dict) or "id" not in item:
                raise ValueError(f"{path}:{number} is not a sample record (no 'id')")
            else:
                records[str(item["id"])] = item
        if header is None:
            raise ValueError(f"{path} has no header line")
        return header, records

    @classmethod
    def open(cls, path: Path, header: dict, overwrite: bool) -> "SampleJournal":
        """Open for appending; resume when the file's fingerprint matches, refuse when it does not."""
        records: dict[str, dict] = {}
        if path.exists() and not overwrite:
            try:
                old_header, records = cls.read(path)
            except ValueError as exc:
                raise ConfigurationMismatch(f"{exc}. Pass --overwrite to start over.") from exc
            if old_header.get("fingerprint") != header["fingerprint"]:
                raise ConfigurationMismatch(
                    _mismatch_message(path, header["config"], old_header.get("config"), "per-sample results")
                )
            header = {**header, "created": old_header.get("created", header.get("created"))}
        journal = cls(path, header, records)
        journal.rewrite()
        return journal

    def rewrite(self, order: list[str] | None = None) -> None:
        """Rewrite the whole file atomically (header + one record per id), e.g. after resuming or at the end."""
        ids = list(self.records)
        if order is not None:
            rank = {qid: i for i, qid in enumerate(order)}
            ids.sort(key=lambda qid: rank.get(qid, len(rank)))
        write_lines_atomic(self.path, [self.header] + [self.records[qid] for qid in ids])

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records[str(record["id"])] = record
