"""The token cache: every sample's token ids and loss-mask spans, tokenized once, then read by slicing.

    ds = PretrainDataset("dataset/pretrain_hq.jsonl", tokenizer, max_length=512, cache_dir="cache")
    # first time: tokenizes the file in min(cpu, 8) processes (progress every 10 s) and writes
    #   cache/pretrain_hq-<16 hex>/  ids.bin offsets.bin spans.bin span_offsets.bin rows.bin meta.json
    # every later time: checks meta.json and each file's crc32, maps the files; no tokenizer call
    python bench/bench_data.py --quick       # start-up (first and second time) and peak RSS

A cache holds one entry per part of each kept sample (E = samples x parts; DPO has 2 parts, chosen
and rejected; entry e is part e % parts of sample e // parts):
  ids.bin           the entries' ids truncated to max_length, end to end: uint16 if the vocab fits, else int32
  offsets.bin       int64 [E + 1]: entry e is ids[offsets[e]:offsets[e + 1]]
  spans.bin         int32 [S, 2]: the (start, end) runs of loss-mask 1s of the entry padded to max_length,
                    so a padded sample gets exactly the mask the dataset computes on the padded array
  span_offsets.bin  int64 [E + 1]: entry e's runs are spans[span_offsets[e]:span_offsets[e + 1]]
  rows.bin          int64 [samples]: the kept rows (JsonlIndex positions), for JsonlIndex.select
  meta.json         version, key, id dtype, counts, the first skipped line's message, each file's size + crc32

The directory is named `<data file stem>-<16 hex>`, a digest of `cache_key` (the data file's path, size,
mtime and first MiB; the dataset class, max_length and parts; the tokenizer, its chat template, pad, BOS
and EOS ids; skip_bad_lines; CACHE_VERSION), so a change to any of them builds a new cache beside the old one
(old ones are not deleted). The build writes into a temporary directory beside it, fsyncs, writes
meta.json last and renames the directory into place, so a reader never sees a partial cache; loading
verifies meta.json and every file's size and crc32, and a cache that fails is logged and rebuilt.

The build splits the file into chunks of CHUNK_LINES lines, and a process pool (fork; the Rust
tokenizer stays single-threaded under TOKENIZERS_PARALLELISM=false, set by lm_dataset) tokenizes each
chunk with one batched tokenizer call. Results come back in file order and are appended to the files
as they arrive, so the main process holds one chunk at a time, never the corpus's ids. Under
torch.distributed rank 0 builds while the other ranks wait at a barrier, then load.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import socket
import tempfile
import time
import zlib
from contextlib import closing
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import numpy as np
import torch.distributed as dist

CACHE_VERSION = 1
CHUNK_LINES = 2048        # lines per worker task: big enough to amortise the batched call, small enough to stream
PROGRESS_SECONDS = 10.0
FILES = ("ids", "offsets", "spans", "span_offsets", "rows")


def log_main(message: str) -> None:
    """Print on the main process only (rank 0, or the only process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(message, flush=True)


class CorruptCache(Exception):
    """A cache directory that must not be used: the reason is the message."""


# ---- where a cache lives ----
def _tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def cache_key(ds, skip_bad_lines: bool) -> list:
    """Everything the cached ids and spans depend on; any change gives another cache directory."""
    path = Path(ds.rows.path).resolve()
    stat = path.stat()
    with open(path, "rb") as f:
        head = hashlib.sha1(f.read(1 << 20)).hexdigest()
    template = getattr(ds.tokenizer, "chat_template", None) or ""
    special = [ds.tokenizer.bos_token_id, ds.tokenizer.eos_token_id]  # minimind-3 pretrain samples hold them
    return [str(path), stat.st_size, stat.st_mtime_ns, head, type(ds).__name__, ds.max_length, ds.parts,
            _tokenizer_digest(ds.tokenizer), template, ds.pad_id, special, bool(skip_bad_lines), CACHE_VERSION]


def cache_location(cache_dir: str | Path, data_path: str | Path, key: list) -> Path:
    digest = hashlib.sha1(json.dumps(key).encode("utf-8")).hexdigest()[:16]
    return Path(cache_dir) / f"{Path(data_path).stem}-{digest}"


# ---- reading ----
def _crc32(path: Path, chunk: int = 4 << 20) -> int:
    """crc32 of a file read in chunks into one buffer (memory stays flat whatever the file size)."""
    crc, buf = 0, bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return crc


class TokenCache:
    """One verified cache directory, read through memory maps opened lazily in each process (so the
    cache pickles small for spawned DataLoader workers; forked ones share the parent's mappings)."""

    def __init__(self, directory: Path, meta: dict):
        self.directory, self.meta = Path(directory), meta
        self.parts, self.num_samples = meta["parts"], meta["samples"]
        self.num_skipped, self.num_unsupervised = meta["skipped"], meta["unsupervised"]
        self.first_skipped = meta["first_skipped"]
        self._maps, self._pid = None, None

    def _map(self) -> dict[str, np.ndarray]:
        if self._pid != os.getpid():
            dtypes = {"ids": np.dtype(self.meta["ids_dtype"]), "offsets": np.int64, "spans": np.int32,
                      "span_offsets": np.int64, "rows": np.int64}
            maps = {}
            for name, dtype in dtypes.items():
                path = self.directory / f"{name}.bin"
                maps[name] = (np.memmap(path, dtype=dtype, mode="r") if self.meta["files"][name]["size"]
                              else np.zeros(0, dtype))   # mmap refuses an empty file
            maps["spans"] = maps["spans"].reshape(-1, 2)
            self._maps, self._pid = maps, os.getpid()
        return self._maps

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None, "_pid": None}

    def entry(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids as int64, mask spans as int32 (k, 2)) of entry e = sample * parts + part."""
        m = self._map()
        a, b = m["offsets"][e:e + 2]
        s, t = m["span_offsets"][e:e + 2]
        return np.asarray(m["ids"][a:b], dtype=np.int64), np.array(m["spans"][s:t])

    def entry_lengths(self) -> np.ndarray:
        """Token count of every entry (int64 [E])."""
        return np.diff(self._map()["offsets"])

    def rows(self) -> np.ndarray:
        """The JsonlIndex positions of the kept samples, in order."""
        return np.array(self._map()["rows"])

    @classmethod
    def load(cls, directory: Path, key: list, lines: int) -> "TokenCache":
        """The cache in `directory` after checking it whole; raises CorruptCache(reason) otherwise."""
        try:
            meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CorruptCache("no meta.json") from None
        except (OSError, ValueError) as e:
            raise CorruptCache(f"unreadable meta.json: {e}") from None
        try:
            if meta["version"] != CACHE_VERSION:
                raise CorruptCache(f"version {meta['version']}, expected {CACHE_VERSION}")
            if meta["key"] != json.loads(json.dumps(key)):
                raise CorruptCache("meta.json is for another data file, tokenizer or max_length")
            if meta["lines"] != lines:
                raise CorruptCache(f"built for {meta['lines']} lines, the file has {lines}")
            entries, isize = meta["samples"] * meta["parts"], np.dtype(meta["ids_dtype"]).itemsize
            expected = {"offsets": 8 * (entries + 1), "span_offsets": 8 * (entries + 1), "rows": 8 * meta["samples"]}
            for name in FILES:
                info, path = meta["files"][name], directory / f"{name}.bin"
                if not path.exists():
                    raise CorruptCache(f"{name}.bin is missing")
                size = path.stat().st_size
                if size != info["size"] or size != expected.get(name, size) or (name == "ids" and size % isize):
                    raise CorruptCache(f"{name}.bin has {size} bytes, expected {info['size']}")
                if _crc32(path) != info["crc32"]:
                    raise CorruptCache(f"{name}.bin fails its crc32 check")
            cache = cls(directory, meta)
        except (KeyError, TypeError) as e:
            raise CorruptCache(f"meta.json lacks {e}") from None
        except OSError as e:
            raise CorruptCache(str(e)) from None
        m = cache._map()
        if m["offsets"][0] != 0 or m["offsets"][-1] * isize != meta["files"]["ids"]["size"] \
                or m["span_offsets"][-1] != len(m["spans"]):
            raise CorruptCache("offsets do not match the ids and spans")
        return cache

    # ---- building ----
    @classmethod
    def open(cls, ds, cache_dir: str | Path, skip_bad_lines: bool, workers: int = 0) -> "TokenCache":
        """The verified cache of dataset `ds` under cache_dir, built first if missing, stale or corrupt.
        Under torch.distributed rank 0 builds, the other ranks wait at a barrier and then load (a rank
        that finds nothing usable, e.g. on another machine's disk, builds its own)."""
        key = cache_key(ds, skip_bad_lines)
        directory = cache_location(cache_dir, ds.rows.path, key)
        if not (dist.is_available() and dist.is_initialized()):
            return cls._load_or_build(ds, directory, key, skip_bad_lines, workers)
        # a gloo group of its own: a build outlasts the default group's timeout (10 min under NCCL)
        group = dist.new_group(backend="gloo", timeout=timedelta(days=1))
        try:
            if dist.get_rank() != 0:
                dist.barrier(group=group)
                return cls._load_or_build(ds, directory, key, skip_bad_lines, workers)
            try:
                return cls._load_or_build(ds, directory, key, skip_bad_lines, workers)
            finally:  # also when the build fails: the other ranks then fail on the same line themselves
                dist.barrier(group=group)
        finally:
            dist.destroy_process_group(group)

    @classmethod
    def _load_or_build(cls, ds, directory: Path, key: list, skip_bad_lines: bool, workers: int) -> "TokenCache":
        if directory.exists():
            try:
                return cls.load(directory, key, len(ds.rows))
            except CorruptCache as e:
                log_main(f"token cache {directory} is corrupt ({e}): rebuilding")
        return cls.build(ds, directory, key, skip_bad_lines, workers)

    @classmethod
    def build(cls, ds, directory: Path, key: list, skip_bad_lines: bool, workers: int = 0) -> "TokenCache":
        """Tokenize every row of `ds` into `directory` (see the module docstring). Raises the first bad
        line's ValueError("path:line: reason") in file order unless skip_bad_lines; then nothing is left."""
        n, t0 = len(ds.rows), time.perf_counter()
        workers = workers or min(os.cpu_count() or 1, 8)
        dtype = np.dtype(np.uint16 if len(ds.tokenizer) <= 1 << 16 else np.int32)
        directory.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_builds(directory)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-{os.getpid()}@{socket.gethostname()}-",
                                    dir=directory.parent))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
            writer = _Writer(tmp)
            log_main(f"token cache: tokenizing {n:,} lines of {ds.rows.path} ({workers} processes) into {directory}")
            done, last = 0, t0
            with closing(_encoded_chunks(ds, dtype, workers)) as chunks:
                for chunk in chunks:
                    if chunk["skipped"] and not skip_bad_lines:
                        raise ValueError(chunk["first_skipped"])
                    writer.add(chunk)
                    done += chunk["lines"]
                    now = time.perf_counter()
                    if now - last >= PROGRESS_SECONDS and done < n:
                        rate = done / (now - t0)
                        log_main(f"token cache: {done:,}/{n:,} lines ({100 * done / n:.0f}%), {rate:,.0f} lines/s, "
                                 f"eta {(n - done) / rate / 60:.1f}min")
                        last = now
            meta = writer.finish(version=CACHE_VERSION, key=key, lines=n, parts=ds.parts, ids_dtype=dtype.name)
            published = _publish(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if not published:  # another process put the same cache in place meanwhile: use theirs
            return cls.load(directory, key, n)
        log_main(f"token cache: {meta['samples']:,} samples, {writer.tokens:,} tokens in "
                 f"{time.perf_counter() - t0:.1f}s -> {directory}")
        return cls(directory, meta)


class _Writer:
    """Appends packed chunks to the cache files, keeping each file's size and running crc32."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.files = {name: open(directory / f"{name}.bin", "wb") for name in FILES}
        self.size, self.crc = dict.fromkeys(FILES, 0), dict.fromkeys(FILES, 0)
        self.tokens = self.spans = self.samples = self.skipped = self.unsupervised = 0
        self.first_skipped = None
        self._write("offsets", np.zeros(1, np.int64))
        self._write("span_offsets", np.zeros(1, np.int64))

    def _write(self, name: str, arr: np.ndarray) -> None:
        data = np.ascontiguousarray(arr).tobytes()
        self.files[name].write(data)
        self.size[name] += len(data)
        self.crc[name] = zlib.crc32(data, self.crc[name])

    def add(self, chunk: dict) -> None:
        self._write("ids", chunk["ids"])
        self._write("offsets", self.tokens + np.cumsum(chunk["lengths"], dtype=np.int64))
        self._write("spans", chunk["spans"])
        self._write("span_offsets", self.spans + np.cumsum(chunk["span_counts"], dtype=np.int64))
        self._write("rows", chunk["rows"])
        self.tokens += int(chunk["lengths"].sum())
        self.spans += int(chunk["span_counts"].sum())
        self.samples += len(chunk["rows"])
        self.skipped += chunk["skipped"]
        self.unsupervised += chunk["unsupervised"]
        self.first_skipped = self.first_skipped or chunk["first_skipped"]

    def finish(self, **fields) -> dict:
        """fsync the data files, then write meta.json (the last file: its presence marks a whole cache)."""
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        meta = {**fields, "samples": self.samples, "tokens": self.tokens, "skipped": self.skipped,
                "unsupervised": self.unsupervised, "first_skipped": self.first_skipped,
                "files": {name: {"size": self.size[name], "crc32": self.crc[name]} for name in FILES}}
        with open(self.directory / "meta.json", "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        return meta


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_abandoned_builds(directory: Path) -> None:
    """Delete the temporary directories of builds of `directory` whose process (on this host) is gone,
    e.g. killed mid-build: each holds up to a whole cache."""
    host = socket.gethostname()
    for tmp in directory.parent.glob(f".{directory.name}.tmp-*@*"):
        pid, _, rest = tmp.name.split(".tmp-", 1)[1].partition("@")
        if rest.rsplit("-", 1)[0] != host or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def _publish(tmp: Path, directory: Path) -> bool:
    """Rename the finished `tmp` to `directory`, moving a corrupt one aside first. False if another
    process published the same directory between the two renames (then `tmp` is removed)."""
    _fsync_dir(tmp)
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.rename(directory, old)
        except FileNotFoundError:
            old = None
    try:
        os.rename(tmp, directory)
    except OSError:  # ENOTEMPTY/EEXIST: someone else's complete cache is there now
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(directory.parent)
    return True


# ---- the build's workers ----
def _pack(ds, start: int, stop: int, dtype: np.dtype) -> dict:
    """Rows [start, stop) of `ds` as arrays ready to append (see _Writer.add)."""
    samples, skipped, unsupervised = ds._encode_range(start, stop)
    entries = [part for _, parts in samples for part in parts]
    ids = np.concatenate([i for i, _ in entries]) if entries else np.zeros(0, np.int64)
    if dtype == np.uint16 and len(ids) and ids.max() > np.iinfo(np.uint16).max:
        raise RuntimeError(f"token id {int(ids.max())} does not fit uint16; len(tokenizer) = {len(ds.tokenizer)}")
    return {"lines": stop - start, "ids": ids.astype(dtype),
            "lengths": np.array([len(i) for i, _ in entries], dtype=np.int64),
            "spans": np.concatenate([s for _, s in entries] or [np.zeros((0, 2), np.int32)]).astype(np.int32),
            "span_counts": np.array([len(s) for _, s in entries], dtype=np.int64),
            "rows": np.array([row for row, _ in samples], dtype=np.int64),
            "skipped": len(skipped), "first_skipped": skipped[0][1] if skipped else None,
            "unsupervised": len(unsupervised)}


_WORKER = {}   # the dataset and id dtype of a pool worker, set once by its initializer


def _init_worker(ds, dtype: np.dtype) -> None:
    # the pool is the parallelism: a tokenizer thread pool per worker would only oversubscribe the cores
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(ds=ds, dtype=dtype)


def _pack_in_worker(bounds: tuple[int, int]) -> dict:
    return _pack(_WORKER["ds"], *bounds, _WORKER["dtype"])


def _encoded_chunks(ds, dtype: np.dtype, workers: int) -> Iterator[dict]:
    """Packed chunks of CHUNK_LINES rows, in file order; several chunks in flight in a process pool.
    Fork passes the dataset to the workers without pickling it (spawn, where fork is missing, pickles it)."""
    n = len(ds.rows)
    bounds = [(a, min(a + CHUNK_LINES, n)) for a in range(0, n, CHUNK_LINES)]
    if workers <= 1 or len(bounds) <= 1:
        for a, b in bounds:
            yield _pack(ds, a, b, dtype)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(min(workers, len(bounds)), initializer=_init_worker, initargs=(ds, dtype)) as pool:
        yield from pool.imap(_pack_in_worker, bounds)
