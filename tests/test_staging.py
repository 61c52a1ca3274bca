"""Node-local weight staging (hpc.job.staging) with real files and real processes.

Each job is a separate Python process calling the wrapper's staging function, as two job
wrappers on one node would: the locks are real flocks between processes, the copies real
copies. What each test shows:
- two jobs staging the same weights at once copy them once: the second waits for the
  first's lock, then reuses its entry (0 bytes copied, same inode);
- a second job reuses the entry (0 bytes), a changed source (size or mtime) is staged anew;
- a folder of weights is staged whole, under its own name;
- eviction removes the least recently used entry but never one a running job uses;
- a job killed mid-copy leaves no entry, and the next job copies cleanly;
- weights larger than the cache's cap, or no path on the node, are served from the source;
- the cache folder is 0700 and this user's; another user's folder of that name is refused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hpc.job.staging import NodeCache, StagingError, cache_root, fingerprint, stage_weights

pytestmark = pytest.mark.timeout(120)

# One job's staging: stage argv[1] into the cache under argv[2] (max_bytes argv[3], 0: none).
# With argv[4] a file name: after the first chunk, say "paused" and wait for that file to
# appear (the parent's "go"). Prints the outcome as JSON, then holds the entry's `use`
# lock until stdin closes (a running job), unless argv[5] is "exit".
JOB = r"""
import json, sys, time
from pathlib import Path
from hpc.job.staging import stage_weights
source, cache_dir, max_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
go = Path(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] != "-" else None
paused = []

def progress(done):
    if go is not None and not paused:
        paused.append(done)
        print("paused", flush=True)
        while not go.exists():
            time.sleep(0.01)

def say(line):
    print("say: " + line, flush=True)

staged, use = stage_weights(
    source, dir_setting=cache_dir, max_bytes=max_bytes or None, environ={}, say=say,
    progress=progress,
)
print(json.dumps({
    "path": str(staged.path), "bytes": staged.bytes_copied, "key": staged.key,
    "note": staged.note, "inode": Path(staged.path).stat().st_ino,
}), flush=True)
if len(sys.argv) <= 5 or sys.argv[5] != "exit":
    sys.stdin.read()
"""

MB = 1024 * 1024


class Job:
    """One staging process (a job wrapper's staging step) and what it printed."""

    def __init__(
        self, source: Path, cache: Path, *, max_bytes: int = 0, go: Path | None = None
    ) -> None:
        argv = [sys.executable, "-c", JOB, str(source), str(cache), str(max_bytes)]
        argv.append(str(go) if go else "-")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
        )
        self.lines: list[str] = []

    def until(self, prefix: str) -> str:
        """Read lines until one starts with ``prefix``; that line."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith(prefix):
                return line
        raise AssertionError(f"the job ended without {prefix!r}: {self.lines}")

    def result(self) -> dict[str, object]:
        """The job's staging outcome (it keeps running, holding its entry)."""
        return dict(json.loads(self.until("{")))

    def end(self) -> None:
        """The job exits (its `use` lock goes with it)."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def weights(path: Path, size: int, fill: bytes = b"w") -> Path:
    path.write_bytes(fill * size)
    return path


def entries(cache: Path) -> list[str]:
    root = cache_root(str(cache), {})
    return sorted(p.name for p in (root / "entries").iterdir())


def test_two_jobs_at_once_copy_once_and_the_second_reuses(tmp_path: Path) -> None:
    source = weights(tmp_path / "model-Q4_K_M.gguf", 24 * MB)
    cache, go = tmp_path / "node", tmp_path / "go"
    first = Job(source, cache, go=go)
    first.until("paused")  # mid-copy, holding the key's lock
    second = Job(source, cache)
    second.until("say: staging: ")  # it found the lock taken
    assert "being staged by another job" in second.lines[-1]
    go.touch()
    one, two = first.result(), second.result()
    first.end()
    second.end()
    assert one["bytes"] == 24 * MB and two["bytes"] == 0
    assert one["path"] == two["path"] and one["inode"] == two["inode"]
    assert Path(str(one["path"])).read_bytes() == source.read_bytes()
    assert entries(cache) == [one["key"]]
    assert [line for line in second.lines if "staging: copied" in line] == []
    assert [line for line in first.lines if "staging: copied" in line] != []


def test_a_later_job_reuses_and_a_changed_source_is_staged_again(tmp_path: Path) -> None:
    source = weights(tmp_path / "w.gguf", 3 * MB)
    cache = tmp_path / "node"
    first = Job(source, cache)
    one = first.result()
    first.end()
    again = Job(source, cache)
    two = again.result()
    again.end()
    assert (one["bytes"], two["bytes"]) == (3 * MB, 0)
    assert one["inode"] == two["inode"]
    weights(source, 3 * MB + 1)  # a new size (and mtime): new weights under the same name
    changed = Job(source, cache)
    three = changed.result()
    changed.end()
    assert three["bytes"] == 3 * MB + 1 and three["key"] != one["key"]
    os.utime(source, ns=(1, 1_000_000_000))  # same size, another mtime
    touched = Job(source, cache)
    four = touched.result()
    touched.end()
    assert four["bytes"] == 3 * MB + 1 and four["key"] not in (one["key"], three["key"])


def test_a_folder_is_staged_whole_under_its_own_name(tmp_path: Path) -> None:
    folder = tmp_path / "gemma hf; echo x"  # a hostile name: spaces, a semicolon
    (folder / "sub").mkdir(parents=True)
    weights(folder / "model.safetensors", MB)
    (folder / "sub" / "config.json").write_text("{}", encoding="utf-8")
    staged, use = stage_weights(
        str(folder), dir_setting=str(tmp_path / "node"), max_bytes=None, environ={}, say=print
    )
    assert use is not None
    use.close()
    assert staged.path.name == folder.name and staged.bytes_copied == MB + 2
    assert (staged.path / "sub" / "config.json").read_text(encoding="utf-8") == "{}"
    assert (staged.path / "model.safetensors").stat().st_mtime_ns == (
        (folder / "model.safetensors").stat().st_mtime_ns
    )


def test_eviction_takes_the_least_recently_used_entry_never_one_in_use(tmp_path: Path) -> None:
    cache = tmp_path / "node"
    cap = 5 * MB
    a, b, c = (weights(tmp_path / f"{n}.gguf", 2 * MB, n.encode()) for n in "abc")
    running = Job(a, cache, max_bytes=cap)  # a: used by a running job all along
    key_a = running.result()["key"]
    done = Job(b, cache, max_bytes=cap)  # b: staged by a job that has ended
    key_b = done.result()["key"]
    done.end()
    assert len({key_a, key_b}) == 2
    # c does not fit beside a and b: b goes (unused), a stays (in use).
    third = Job(c, cache, max_bytes=cap)
    key_c = third.result()["key"]
    third.end()
    assert entries(cache) == sorted([key_a, key_c])
    # A 3 MB source evicts c (unused), never a; a 6 MB one exceeds the cap: not staged,
    # and nothing is evicted for it.
    d = weights(tmp_path / "d.gguf", 3 * MB, b"d")
    fourth = Job(d, cache, max_bytes=cap)
    key_d = fourth.result()["key"]
    fourth.end()
    assert entries(cache) == sorted([key_a, key_d])
    big = weights(tmp_path / "big.gguf", 6 * MB)
    staged, use = stage_weights(
        str(big), dir_setting=str(cache), max_bytes=cap, environ={}, say=print
    )
    assert use is None and staged.path == big and staged.key is None
    assert staged.note is not None and "exceed staging.max_bytes" in staged.note
    assert entries(cache) == sorted([key_a, key_d])
    running.end()
    # With a's job gone, a is evictable like any other.
    e = weights(tmp_path / "e.gguf", 4 * MB, b"e")
    staged, use = stage_weights(
        str(e), dir_setting=str(cache), max_bytes=cap, environ={}, say=print
    )
    assert use is not None
    use.close()
    assert staged.key is not None and entries(cache) == [staged.key]


def test_a_job_killed_mid_copy_leaves_no_entry(tmp_path: Path) -> None:
    source = weights(tmp_path / "w.gguf", 20 * MB)
    cache, never = tmp_path / "node", tmp_path / "never"
    doomed = Job(source, cache, go=never)
    doomed.until("paused")  # 8 MiB of 20 written, in tmp/
    root = cache_root(str(cache), {})
    assert [p.name for p in (root / "tmp").iterdir()] != []
    os.kill(doomed.proc.pid, signal.SIGKILL)
    doomed.proc.wait(timeout=30)
    assert entries(cache) == []
    after = Job(source, cache)
    result = after.result()
    after.end()
    assert result["bytes"] == 20 * MB
    assert Path(str(result["path"])).read_bytes() == source.read_bytes()
    assert list((root / "tmp").iterdir()) == []  # the leftover went with the new copy


def test_the_cache_is_private_and_another_users_folder_is_refused(tmp_path: Path) -> None:
    source = weights(tmp_path / "w.gguf", MB)
    _, use = stage_weights(
        str(source), dir_setting=str(tmp_path / "node"), max_bytes=None, environ={}, say=print
    )
    assert use is not None
    use.close()
    root = cache_root(str(tmp_path / "node"), {})
    assert (root.stat().st_mode & 0o777) == 0o700
    assert ((root / "entries").stat().st_mode & 0o777) == 0o700
    # A link planted under this user's folder name (another user's folder) is refused.
    elsewhere = tmp_path / "planted"
    elsewhere.mkdir()
    other = cache_root(str(tmp_path / "other"), {})
    other.parent.mkdir()
    other.symlink_to(elsewhere)
    with pytest.raises(StagingError) as caught:
        NodeCache(other).open()
    assert caught.value.hint is not None
    # The job is not stopped by it: its engine reads the source, and the note says why.
    staged, use = stage_weights(
        str(source), dir_setting=str(tmp_path / "other"), max_bytes=None, environ={}, say=print
    )
    assert use is None and staged.path == source
    assert staged.note is not None and "not a directory of this user" in staged.note
    assert list(elsewhere.iterdir()) == []  # nothing written into the planted folder


def test_a_cache_dir_that_cannot_be_made_serves_the_source(tmp_path: Path) -> None:
    source = weights(tmp_path / "w.gguf", MB)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")
    staged, use = stage_weights(
        str(source), dir_setting=str(blocker), max_bytes=None, environ={}, say=print
    )
    assert use is None and staged.path == source and staged.bytes_copied == 0
    assert staged.note is not None and "cannot be used" in staged.note


def test_weights_that_are_no_path_on_the_node_are_not_staged(tmp_path: Path) -> None:
    said: list[str] = []
    staged, use = stage_weights(
        "google/gemma-3-270m", dir_setting="$TMPDIR", max_bytes=None, environ={}, say=said.append
    )
    assert use is None and staged.note is not None and staged.bytes_copied == 0
    assert said and "not staged" in said[0]


def test_tmpdir_setting_follows_the_jobs_tmpdir(tmp_path: Path) -> None:
    assert cache_root("$TMPDIR", {"TMPDIR": str(tmp_path)}).parent == tmp_path
    assert cache_root("/dev/shm", {"TMPDIR": str(tmp_path)}).parent == Path("/dev/shm")
    key, size = fingerprint(weights(tmp_path / "x", 10))
    assert size == 10 and len(key) == 32
