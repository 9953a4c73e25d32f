"""C kernels compiled on the machine that runs them: the CPU decoding step (decode.c).

`decode_library()` returns the step as a ctypes library, built on first use with the C
compiler found here (`$CC`, else `cc` or `gcc`) for this CPU (`-march=native`, so the vector
width follows the machine), and kept under `~/.cache/tinyllama/kernels/` (or
`$TINYLLAMA_CACHE/kernels/`, or `$XDG_CACHE_HOME/tinyllama/kernels/`), one build per source,
compiler, flags and CPU. A build goes through atomic.building_folder, so concurrent processes
(the ranks of a torchrun) and a killed build never leave a half-written library behind.

Where no compiler is found or the build fails, `decode_library()` returns None and
`decode_unavailable()` says why: fast_decode then runs its NumPy step (the same math, slower).
`TINYLLAMA_KERNELS=0` in the environment asks for that path without trying.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Optional, Tuple

from tinyllama.atomic import building_folder

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode.c")
FLAGS = ["-O3", "-march=native", "-std=gnu11", "-ffp-contract=fast", "-fPIC", "-shared"]
OPENMP = "-fopenmp"  # the threads; a compiler without OpenMP builds a one-thread step
LIBRARY = "decode.so"


def cache_root() -> Path:
    """Where built kernels are kept."""
    if os.environ.get("TINYLLAMA_CACHE"):
        return Path(os.environ["TINYLLAMA_CACHE"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tinyllama" / "kernels"


def find_compiler() -> Optional[str]:
    """The C compiler kernels are built with: $CC, else cc or gcc; None if there is none."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def _cpu() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def _build(compiler: str) -> Tuple[Optional[Path], str]:
    """The library for this source, compiler and CPU: built now unless already kept. Returns
    (its path, "") or (None, why not)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\0".join(
            [SOURCE.read_text(), compiler, version, " ".join(FLAGS), OPENMP, platform.machine(), _cpu()]
        ).encode()
    ).hexdigest()[:16]
    folder = cache_root() / f"decode-{key}"
    if (folder / LIBRARY).is_file():
        return folder / LIBRARY, ""
    try:
        with building_folder(folder) as tmp:
            for flags in ([*FLAGS, OPENMP], FLAGS):
                result = subprocess.run(
                    [compiler, *flags, str(SOURCE), "-o", str(tmp / LIBRARY), "-lm"],
                    capture_output=True,
                    text=True,
                )
                if result.returncode == 0:
                    break
            if result.returncode != 0:  # raised, so that building_folder drops the attempt
                raise RuntimeError((result.stderr.strip().splitlines() or ["no message"])[-1])
    except RuntimeError as error:
        return None, f"{compiler} failed on {SOURCE.name}: {error}"
    except Exception as error:  # a folder we may not write, a full disk: decode without the kernel
        if not (folder / LIBRARY).is_file():
            return None, f"could not build {SOURCE.name} in {folder}: {error}"
    return folder / LIBRARY, ""


@functools.lru_cache(maxsize=None)
def _load() -> Tuple[Optional[ctypes.CDLL], str]:
    if os.environ.get("TINYLLAMA_KERNELS", "1") == "0":
        return None, "TINYLLAMA_KERNELS=0"
    compiler = find_compiler()
    if compiler is None:
        return None, "no C compiler found (set CC, or install gcc)"
    path, reason = _build(compiler)
    if path is None:
        return None, reason
    try:
        library = ctypes.CDLL(str(path))
    except OSError as error:
        return None, f"could not load {path}: {error}"
    library.tl_decode.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    library.tl_decode.restype = ctypes.c_int
    library.tl_workspace.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    library.tl_workspace.restype = ctypes.c_size_t
    logger.debug("decoding kernel: %s", path)
    return library, ""


_told: set = set()  # the reasons already logged: one INFO line per reason and process


def decode_library() -> Optional[ctypes.CDLL]:
    """The compiled decoding step, or None where it cannot be built here (decode_unavailable)."""
    library, reason = _load()
    if library is None and reason not in _told:
        _told.add(reason)
        logger.info("CPU decoding runs in NumPy, without the compiled step: %s", reason)
    return library


def decode_unavailable() -> Optional[str]:
    """Why the compiled step is not available here, or None if it is."""
    return _load()[1] or None


# The structures of decode.c, field for field.


class Matrix(ctypes.Structure):
    _fields_ = [
        ("w", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("k", ctypes.c_int32),
        ("panels", ctypes.c_int32),
        ("n", ctypes.c_int32),
        ("glu", ctypes.c_int32),
    ]


class Layer(ctypes.Structure):
    _fields_ = [
        ("input_layernorm", ctypes.c_void_p),
        ("post_attention_layernorm", ctypes.c_void_p),
        ("qkv", Matrix),
        ("o_proj", Matrix),
        ("gate_up", Matrix),
        ("down_proj", Matrix),
    ]


class Model(ctypes.Structure):
    _fields_ = [
        ("layers", ctypes.c_int32),
        ("hidden", ctypes.c_int32),
        ("heads", ctypes.c_int32),
        ("kv_heads", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("vocab", ctypes.c_int32),
        ("eps", ctypes.c_float),
        ("scaling", ctypes.c_float),
        ("layer", ctypes.POINTER(Layer)),
        ("norm", ctypes.c_void_p),
        ("lm_head", Matrix),
    ]


class Step(ctypes.Structure):
    _fields_ = [
        ("batch", ctypes.c_int32),
        ("past", ctypes.c_int32),
        ("rope_rows", ctypes.c_int32),
        ("capacity", ctypes.POINTER(ctypes.c_int32)),
        ("x", ctypes.c_void_p),
        ("cos", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
        ("mask", ctypes.c_void_p),
        ("keys", ctypes.POINTER(ctypes.c_void_p)),
        ("values", ctypes.POINTER(ctypes.c_void_p)),
        ("logits", ctypes.c_void_p),
        ("work", ctypes.c_void_p),
    ]
