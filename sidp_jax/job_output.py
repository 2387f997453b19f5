"""Output of the offline job: result records, appended and flushed one line at a time, and the
recovery of what an earlier (possibly killed) run already wrote."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sidp_jax.job_input import Key, Request, is_valid_id



def recover_output(path: Path) -> set[Key]:
    """Keys of the records already in `path`, after truncating a torn tail away."""
    done: set[Key] = set()
    if not path.exists():
        return done
    good_end = offset = 0  # good_end: just past the last whole, parsable record
    pending_bad = middle_bad = 0
    with open(path, "rb+") as f:
        for raw in f:
            offset += len(raw)
            key = _record_key(raw) if raw.endswith(b"\n") else None
            if key is None:
                pending_bad += 1
                continue
            done.add(key)
            good_end = offset
            middle_bad, pending_bad = middle_bad + pending_bad, 0
        if good_end < offset:
            f.truncate(good_end)
            print(f"Truncated {offset - good_end} bytes of torn record(s) at the end of {path}", file=sys.stderr)
    if middle_bad:
        print(f"warning: {path} has {middle_bad} unparsable line(s) before its end, left in place", file=sys.stderr)
    return done


def _record_key(raw: bytes) -> Key | None:
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(rec, dict):
        return None
    if is_valid_id(rec.get("id")):
        return rec["id"]
    if isinstance(rec.get("line"), int) and "error" in rec:
        return ("line", rec["line"])
    return None


class ResultWriter:
    """Appends records, each as one write of a whole line followed by a flush."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", encoding="utf-8", errors="backslashreplace")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def completion_fields(c) -> dict:
    fields = {"text": c.text, "token_ids": [int(t) for t in c.token_ids], "finish_reason": c.finish_reason}
    if c.logprobs is not None:
        fields["logprobs"] = [{str(int(t)): float(lp) for t, lp in step.items()} for step in c.logprobs]
    return fields


def result_record(req: Request, out) -> dict:
    completions = sorted(out.outputs, key=lambda c: c.index)
    record = {
        "id": req.id,
        **completion_fields(completions[0]),
        "prompt_tokens": len(req.prompt_ids),
        "output_tokens": sum(len(c.token_ids) for c in completions),
    }
    if len(completions) > 1:
        record["completions"] = [completion_fields(c) for c in completions]
    return record
