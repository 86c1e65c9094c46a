"""Atomic saves: a file is either the old one or the complete new one, never half written."""
from __future__ import annotations

import glob
import os
import shutil
from typing import Callable

import torch


def _read_umask() -> int:
    mask = os.umask(0)   # the only way to read it is to set it: done once, at import, not around every save
    os.umask(mask)
    return mask


UMASK = _read_umask()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)   # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphans(path: str) -> list[str]:
    """Delete the `<path>.tmp<PID>` files that a process killed during a save left behind (POSIX only: on
    Windows signal 0 is not a harmless probe)."""
    removed = []
    if os.name != "posix":
        return removed
    for tmp in glob.glob(glob.escape(path) + ".tmp*"):
        pid = tmp[len(path) + len(".tmp"):]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            try:
                os.remove(tmp)
                removed.append(tmp)
            except OSError:
                pass
    return removed


def _is_io_error(e: Exception) -> bool:
    """OSError, or how torch.save ("inline_container ... unexpected pos") and safetensors ("I/O error") report one."""
    return isinstance(e, OSError) or any(m in str(e) for m in ("inline_container", "I/O error", "os error"))


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """Call write(tmp) on a temporary path in the same folder, then move it over `path` in one step. The file
    gets the usual permissions (0666 less the umask; some writers create 0600 files), and a failed write (full
    disk, read-only folder) raises OSError naming the path."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(folder, exist_ok=True)
        remove_orphans(path)
        write(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except Exception as e:
        if not _is_io_error(e):
            raise
        try:
            free = f"{shutil.disk_usage(folder).free / 2 ** 20:.0f} MiB free there"
        except OSError:
            free = "its folder cannot be read"
        raise OSError(f"could not write {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else repr(e)}); "
                      f"{free}: check the disk has space and the folder is writable") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_save(obj, path: str) -> str:
    """torch.save, atomically; read back with torch.load(path, weights_only=True)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
