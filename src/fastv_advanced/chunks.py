"""Chunk merging: one result from the per-chunk JSONLs of `--num-chunks/--chunk-idx` runs or `accelerate launch`
shards.

A chunk JSONL is `<stem>.chunk{i}of{n}.jsonl`: the header of its configuration (with `selection.chunk_idx`,
`selection.num_chunks` and the chunk's question ids) and one record per finished sample. `merge_chunks` writes
`<stem>.jsonl` (records in question order) and the result `<stem>.json`, as an unchunked run would.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .flops import DecoderShape
from .metrics import build_result, failures, summarize
from .run_config import RunConfig
from .run_files import ConfigurationMismatch, SampleJournal, check_result_file, differences
from .run_files import write_json_atomic, write_lines_atomic

_CHUNK_SUFFIX = re.compile(r"^(?P<stem>.+)\.chunk(?P<idx>\d+)of(?P<num>\d+)\.jsonl$")


@dataclass
class _Chunk:
    """One chunk JSONL: its path, header and records by question id."""

    path: Path
    header: dict
    records: dict[str, dict]

    @property
    def index(self) -> int:
        return self.header["selection"]["chunk_idx"]


def find_chunk_files(directory: str | os.PathLike, stem: str | None = None) -> dict[str, list[Path]]:
    """Chunk JSONLs in `directory`, grouped by result stem (`<stem>.chunk{i}of{n}.jsonl`)."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(Path(directory).glob("*.chunk*of*.jsonl")):
        match = _CHUNK_SUFFIX.match(path.name)
        if match and (stem is None or match["stem"] == stem):
            groups.setdefault(match["stem"], []).append(path)
    return groups


def merge_chunks(
    paths: list[str | os.PathLike],
    output_dir: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    allow_partial: bool = False,
    command: str | None = None,
) -> dict:
    """Merge the per-chunk JSONLs of one configuration into `<stem>.jsonl` + the result `<stem>.json`.

    Every chunk of the run must be there, with the same fingerprint, and complete (each id of its selection has
    a record) unless `allow_partial`. Writes into `output_dir` (default: the first chunk's folder). Returns the
    result dict, plus `result_file` and `failures` (the messages of the samples that could not be evaluated),
    which are not in the file.
    """
    chunks = _read_chunks(paths)
    first = chunks[0]
    num_chunks = _check_same_split(chunks, allow_partial)
    chunks.sort(key=lambda chunk: chunk.index)
    selected_ids, merged = _merged_records(chunks, allow_partial)

    output_dir = Path(output_dir) if output_dir is not None else first.path.parent
    output_dir.mkdir(parents=True, exist_ok=True)
    result_path = output_dir / first.header["result_name"]
    jsonl_path = result_path.with_suffix(".jsonl")
    _check_merge_target(result_path, jsonl_path, first.header, overwrite)

    records = [merged[qid] for qid in selected_ids if qid in merged]
    header = _merged_header(first.header, chunks, selected_ids, command)
    run_config = RunConfig.from_dict(first.header["config"]["run"])
    summary = summarize(records, run_config, DecoderShape(**first.header["decoder_shape"]),
                        num_selected=len(selected_ids))
    write_lines_atomic(jsonl_path, [header] + records)
    result = build_result(
        summary, header, jsonl_name=jsonl_path.name, started=None,
        extra={"merged_from_chunks": {"num_chunks": num_chunks, "files": [c.path.name for c in chunks],
                                      "commands": [c.header.get("command") for c in chunks]}},
    )
    write_json_atomic(result_path, result)
    result["result_file"] = str(result_path)
    result["failures"] = failures(records)
    return result


def _read_chunks(paths: list[str | os.PathLike]) -> list[_Chunk]:
    if not paths:
        raise ValueError("no chunk files to merge")
    chunks = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ValueError(f"chunk file {path} does not exist")
        header, records = SampleJournal.read(path)
        chunks.append(_Chunk(path, header, records))
    return chunks


def _check_same_split(chunks: list[_Chunk], allow_partial: bool) -> int:
    """The number of chunks of the run, after checking that `chunks` are distinct chunks of one configuration and
    one split, and (unless `allow_partial`) that none is missing."""
    first = chunks[0]
    num_chunks = first.header["selection"]["num_chunks"]
    num_samples = first.header["selection"].get("num_samples")
    seen: dict[int, Path] = {}
    for chunk in chunks:
        if chunk.header["fingerprint"] != first.header["fingerprint"]:
            raise ConfigurationMismatch(
                f"{chunk.path} and {first.path} are chunks of different configurations: "
                + "; ".join(differences(chunk.header["config"], first.header["config"])[:6])
            )
        selection = chunk.header["selection"]
        if selection["num_chunks"] != num_chunks or selection.get("num_samples") != num_samples:
            raise ValueError(
                f"{chunk.path} is chunk {selection['chunk_idx']} of {selection['num_chunks']} "
                f"(num_samples {selection.get('num_samples')}), {first.path} of {num_chunks} "
                f"(num_samples {num_samples}): not the same split"
            )
        if chunk.index in seen:
            raise ValueError(f"{chunk.path} and {seen[chunk.index]} are both chunk {chunk.index}")
        seen[chunk.index] = chunk.path
    missing = sorted(set(range(num_chunks)) - set(seen))
    if missing and not allow_partial:
        raise ValueError(f"chunks {missing} of {num_chunks} are missing (have: {sorted(seen)})")
    return num_chunks


def _merged_records(chunks: list[_Chunk], allow_partial: bool) -> tuple[list[str], dict[str, dict]]:
    """The selected question ids in chunk order and the records by id; a chunk that lacks records is refused
    unless `allow_partial`."""
    selected_ids: list[str] = []
    merged: dict[str, dict] = {}
    incomplete = []
    for chunk in chunks:
        ids = chunk.header["selection"]["ids"]
        selected_ids += ids
        lacking = [qid for qid in ids if qid not in chunk.records]
        if lacking:
            incomplete.append(f"{chunk.path.name}: {len(lacking)} of {len(ids)} samples missing")
        merged.update({qid: chunk.records[qid] for qid in ids if qid in chunk.records})
    if incomplete and not allow_partial:
        raise ValueError(
            "incomplete chunks (re-run them to resume, or pass --allow-partial): " + "; ".join(incomplete)
        )
    if len(set(selected_ids)) != len(selected_ids):
        raise ValueError("the chunks' selections overlap: a question id appears in two chunks")
    return selected_ids, merged


def _check_merge_target(result_path: Path, jsonl_path: Path, header: dict, overwrite: bool) -> None:
    """Refuse (`ConfigurationMismatch`) a result file or JSONL of another configuration unless `overwrite`."""
    check_result_file(result_path, header["config"], overwrite)
    if not jsonl_path.exists() or overwrite:
        return
    try:
        existing, _ = SampleJournal.read(jsonl_path)
    except ValueError:
        existing = {}
    if existing.get("fingerprint") != header["fingerprint"]:
        raise ConfigurationMismatch(
            f"{jsonl_path} holds per-sample results of a different configuration; pass --overwrite to replace "
            "it, or --output-dir to merge elsewhere"
        )


def _merged_header(first: dict, chunks: list[_Chunk], selected_ids: list[str], command: str | None) -> dict:
    """The merged JSONL's header: the first chunk's, with the whole selection and where it came from."""
    header = dict(first)
    header["selection"] = {
        "num_samples": first["selection"].get("num_samples"), "num_chunks": 1, "chunk_idx": 0, "ids": selected_ids,
        "merged_from": [str(c.path) for c in chunks],
    }
    if command is not None:
        header["command"] = command
    return header
