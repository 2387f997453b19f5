"""Output of the offline job: result records, appended and flushed one line at a time, and the
recovery of what an earlier (possibly killed) run already wrote, under an exclusive lock. The
records are in the input's format (sidp_jax/jobs/formats.py); an output holds one format."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import sys
from pathlib import Path

from sidp_jax.jobs.formats import BY_NAME, record_of
from sidp_jax.jobs.job_request import Key

MARKER_SUFFIX = ".sidp-job"  # beside the output: marks it as this job's, and holds its lock


class OutputError(Exception):
    """The output cannot be used as it is (a user error, not a bug): the job exits 2."""


class OutputWriteError(OutputError):
    """Writing a record failed (disk full, I/O error): the job stops; a rerun resumes."""


class SettingsChanged(OutputError):
    """The output holds records made with other settings than this run's: the job exits 2 unless
    the user accepts the new ones (--accept-new-settings)."""


@dataclasses.dataclass
class Recovered:
    done: set  # keys that need no run: results, and error records unless they are retried
    retryable: int  # keys whose only records are errors (what --retry-errors would run again)
    retried: int  # error records dropped for --retry-errors
    fmt: str | None = None  # the format of the records found (None: no records)


class JobOutput:
    """One job's results file: exclusively locked, checked before use, appended one whole line at a
    time (each write followed by a flush).

    The job only ever removes bytes it wrote itself, which the marker file beside the output
    proves (`<output>.sidp-job`, created with the output, also the lock): a torn final record
    (no newline: a write cut by kill -9 or a full disk), and, for --retry-errors, its own error
    records (the file is rewritten beside and renamed over, so no state is ever half-written).
    A file that is the input, a directory, or holds lines that are not records is refused."""

    def __init__(self, path: Path, input_path: Path | None = None):
        given = Path(path)
        if given.is_dir():
            raise OutputError(f"--output {given} is a directory; give a file path")
        if given.exists() and not given.is_file():
            raise OutputError(f"--output {given} is not a regular file (a device, pipe or socket); give a file path")
        if input_path is not None and given.exists() and given.resolve() == Path(input_path).resolve():
            raise OutputError(f"--output {given} is the input file; write the results to another file")
        self.path = given.resolve()  # the real file: a job through a symlink takes the same marker and lock
        self.marker = marker_path(given)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.marker, "a+", encoding="utf-8")
        except OSError as e:
            raise OutputError(f"cannot write beside --output {given}: {e.strerror or e} ({self.marker})") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise OutputError(f"another job is writing {self.path}: it holds the lock on {self.marker}") from None
        self._lock.seek(0)
        marked = self._lock.read()
        self.ours = bool(marked.strip()) or not self.path.exists()  # marked, or about to be created
        self.recorded = _recorded_settings(marked)  # what the earlier run recorded; None: nothing (or older job)
        self._f = None

    def recover(self, retry_errors: bool = False, fmt: str | None = None, settings: dict | None = None,
                accept_new_settings: bool = False) -> Recovered:
        """Check the existing output and learn what it holds (call once, before writing). Reads the
        file line by line: memory holds the keys, not the records.
        fmt: the format the records must be in (the input's); None: any, but only one.
        settings: what this run's results depend on ({name: value}), recorded in the marker; an
        output whose records were made with other settings is refused (SettingsChanged) unless
        accept_new_settings."""
        results, errors = set(), set()
        if self.path.exists():
            with open(self.path, "rb+") as f:
                good_end = 0  # just past the last whole line
                for n, raw in enumerate(f, 1):
                    if not raw.endswith(b"\n"):  # a final line without its newline: a torn write
                        self._drop_torn_tail(f, good_end, len(raw))
                        break
                    good_end += len(raw)
                    if not raw.strip():
                        continue
                    kind, key, rec_fmt = _record_key(raw)
                    if kind is None:
                        raise OutputError(f"line {n} of {self.path} is not a result or error record of this job "
                                          f"({raw[:60]!r}): refusing to append to it; use another --output")
                    if fmt is not None and rec_fmt != fmt:
                        raise OutputError(f"line {n} of {self.path} is a record of the {BY_NAME[rec_fmt].title} "
                                          f"format, but the input is in the {BY_NAME[fmt].title} format: an output "
                                          f"holds one format; use another --output")
                    fmt = rec_fmt
                    (results if kind == "result" else errors).add(key)
        if (results or errors) and settings is not None and self.recorded is not None and not accept_new_settings:
            changed = settings_diff(self.recorded, settings)
            if changed:
                raise SettingsChanged(
                    f"{self.path} holds {len(results | errors)} records made with other settings: "
                    f"{'; '.join(changed)}. Rerun with the same settings to resume, use another --output, or "
                    f"pass --accept-new-settings to continue this output with the new ones (its records stay)")
        error_only = errors - results
        retried = self._drop_error_records(error_only) if retry_errors and error_only else 0
        self._mark(settings)
        done = results | (set() if retry_errors else errors)
        return Recovered(done, len(error_only), retried, fmt if (results or errors) else None)

    def _drop_torn_tail(self, f, good_end: int, torn: int) -> None:
        if not self.ours:
            raise OutputError(f"{self.path} ends in an incomplete line that no sidp-jax job wrote "
                              f"(no {self.marker.name} beside it): not a results file? Use another --output")
        f.truncate(good_end)
        print(f"Truncated {torn} bytes of a torn record at the end of {self.path}", file=sys.stderr)

    def _drop_error_records(self, keys: set) -> int:
        """Rewrite the output beside itself without the error records of `keys`, then rename it
        over (never half-written); returns how many records went."""
        tmp = self.path.with_name(self.path.name + ".retry-tmp")
        dropped = 0
        with open(self.path, "rb") as src, open(tmp, "wb") as dst:
            for raw in src:
                kind, key, _ = _record_key(raw) if raw.strip() else (None, None, None)
                if kind == "error" and key in keys:
                    dropped += 1
                    continue
                dst.write(raw)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, self.path)
        return dropped

    def _mark(self, settings: dict | None) -> None:
        mark = {"written_by": "sidp-jax offline job", "output": self.path.name}
        if settings is not None:
            mark["settings"] = settings
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(json.dumps(mark) + "\n")
        self._lock.flush()

    def write(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        try:
            if self._f is None:
                self._f = open(self.path, "a", encoding="utf-8", errors="backslashreplace")
            self._f.write(line)
            self._f.flush()
        except OSError as e:
            raise OutputWriteError(f"could not write to {self.path}: {e}. The records before this one are "
                                   f"saved; free space or fix the cause, then rerun the same command to resume") from e

    def close(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass
        self._lock.close()


def _recorded_settings(marked: str) -> dict | None:
    try:
        settings = json.loads(marked).get("settings")
    except (ValueError, AttributeError):
        return None
    return settings if isinstance(settings, dict) else None


def settings_diff(before: dict, now: dict) -> list[str]:
    """'name: old -> new' for each setting that differs ("unset": not given)."""
    show = lambda v: "unset" if v is None else json.dumps(v)
    return [f"{name}: {show(before.get(name))} -> {show(now.get(name))}"
            for name in sorted(set(before) | set(now)) if before.get(name) != now.get(name)]


def marker_path(output: Path) -> Path:
    """The marker and lock of an output: beside the real file (symlinks resolved)."""
    real = Path(output).resolve()
    return real.with_name(real.name + MARKER_SUFFIX)


def _record_key(raw: bytes) -> tuple[str | None, Key, str | None]:
    """("result" | "error", key, format) of a record line, or (None, None, None) for anything else."""
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, None, None
    return record_of(rec)
