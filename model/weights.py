"""The native weight-file format, in one place: names, integrity, reading, and atomic writing.

    out/{name}_{hidden}[_moe].pth     fp16 state dict, the original's keys (both tied keys present)
    out/{name}_{hidden}[_moe].json    the model config, so later loading needs no size flags

  * names: weight_path, `{save_dir}/{name}_{hidden}[_moe]{suffix}` (the trainers' resume files use it too);
  * integrity: torch.save writes a zip archive with a CRC-32 per record; verify_checkpoint checks them before
    every torch.load, so a damaged file is an error naming it, never silently wrong weights;
  * reading: read_state_dict (verified, tensors only, DDP/compile prefixes removed);
  * writing: atomic_save (a temp file in the same folder, fsync, os.replace), so a process killed at any
    moment leaves the old file or the new one, never half of one; save_weights (fp16 + .json);
  * LoadError / NotFoundError: a file that cannot be used, with a one-line message for the user.
Imports nothing from this project (serving, converting and training all use it).
"""
import json
import os
import tempfile
import zipfile
from pathlib import Path

import torch


class LoadError(ValueError):
    """A model, adapter, config or tokenizer that cannot be loaded; the message is one line for the user."""


class NotFoundError(LoadError, FileNotFoundError):
    """A LoadError for a file or folder that does not exist (also a FileNotFoundError)."""


def short_error(err: BaseException) -> str:
    """`TypeName: first line of the message`, for a library error quoted inside a LoadError."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


# ---- names ----
def weight_path(save_dir, name: str, cfg, suffix: str = ".pth") -> Path:
    """The one place weight file names are built: `{save_dir}/{name}_{hidden}[_moe]{suffix}`
    (cfg: anything with hidden_size and use_moe)."""
    moe = "_moe" if getattr(cfg, "use_moe", False) else ""
    return Path(save_dir) / f"{name}_{cfg.hidden_size}{moe}{suffix}"


# ---- reading ----
def verify_checkpoint(path) -> None:
    """Check every record of a torch.save file against its CRC-32 (the zip format torch.save writes) before
    it is loaded; a mismatch, a damaged or a truncated archive is a LoadError naming the file. Files in the
    legacy non-zip format carry no checksums and pass unchecked (torch.load still reports garbage).
    Streams each record once in 1 MiB chunks; bench/bench_loading.py measures it next to torch.load."""
    path = Path(path)
    record = None
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return
        with zipfile.ZipFile(path) as archive:
            for record in archive.namelist():
                with archive.open(record) as stream:   # the CRC is compared when the record's end is read
                    while stream.read(1 << 20):
                        pass
    except OSError as err:
        raise LoadError(f"{path}: cannot be read ({short_error(err)})") from None
    except Exception as err:  # zipfile raises BadZipFile, EOFError, ValueError, ... for damaged bytes
        if record is None:
            reason = f"damaged or truncated zip archive: {short_error(err)}"
        elif "CRC" in str(err):
            reason = f"CRC mismatch in record {record}"
        else:
            reason = f"damaged record {record}: {short_error(err)}"
        raise LoadError(f"{path} is corrupted ({reason}); restore it or retrain") from None


def read_state_dict(path) -> dict:
    """The verified state dict of a .pth file (CPU, DDP `module.` and compile `_orig_mod.` prefixes removed)."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{path} not found")
    verify_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a file that is not a checkpoint
        raise LoadError(f"{path}: not a readable weight file ({short_error(err)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoadError(f"{path}: not a state dict of tensors (a resume file? load out/*.pth weights instead)")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


# ---- writing ----
def atomic_save(obj, path) -> None:
    """torch.save (or text/bytes) to a temp file next to `path`, fsync, then os.replace (atomic on POSIX and
    Windows). The temp name carries the writer's pid, so temp files left by a killed writer are removed by
    the next save of the same file. The file gets the usual permissions (0666 minus the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(obj, (str, bytes)):
                f.write(obj.encode() if isinstance(obj, str) else obj)
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, OSError):   # e.g. a full disk: name the file, not the temp file
            raise OSError(err.errno, f"{err.strerror or err}; the previous file is unchanged", str(path)) from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_stale_temps(path: Path) -> None:
    """Delete `.{name}.{pid}.*.tmp` files next to `path` whose writer process is gone."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False        # our own earlier temp file: that save failed and is over
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def half_state_dict(model) -> dict:
    """The original's weight format: every tensor fp16 on the CPU (both tied keys present). `model` may also
    be a full state dict already (what FSDP gathers on rank 0)."""
    state = model if isinstance(model, dict) else model.state_dict()
    return {k: v.detach().half().cpu() for k, v in state.items()}


def save_weights(model, path, lm_config=None) -> Path:
    """`path` := the fp16 weights of `model` (a module or a state dict); with lm_config also its config as the
    `.json` next to it. Both written atomically; returns the path."""
    atomic_save(half_state_dict(model), path)
    if lm_config is not None:
        atomic_save(json.dumps(lm_config.to_dict(), indent=2, ensure_ascii=False), Path(path).with_suffix(".json"))
    return Path(path)
