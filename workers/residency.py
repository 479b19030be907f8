"""Which models this worker process holds, and whether one more fits.

A worker keeps each model it loads for its whole life (``get_text_generator`` and
``get_image_generator`` cache them per process), so a text and a picture model are held
together when memory allows. Before a model loads, :func:`check_fits` compares its weights'
size (the files of a local folder, scaled to the dtype it will run in) with what is free: the
device's free memory (CUDA: ``torch.cuda.mem_get_info``; CPU: ``MemAvailable``) or, when
``MUSESPARK_MODEL_MEMORY_GB`` is set, that budget less the models already resident. A model
that does not fit is refused with :class:`~core.errors.ModelUnavailableError` (the job fails
with a plain message; the worker goes on), not by running out of memory mid-load.

:func:`resident` is what status pages and metrics read: one JSON-ready row per model, also
written to the log on every load (``resident models: ...``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from core.errors import ModelUnavailableError
from core.settings import get_settings

__all__ = ["MEMORY_HEADROOM", "Resident", "check_fits", "estimate_bytes", "free_bytes",
           "register", "resident"]

log = logging.getLogger(__name__)

#: Weights take this share of what a model needs; the rest is activations and workspace.
MEMORY_HEADROOM = 1.25
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
_GB = 1024**3


@dataclass(frozen=True, slots=True)
class Resident:
    """A model held by this process."""

    kind: str  # "text" | "image"
    name: str
    device: str
    dtype: str
    bytes: int
    loaded_at: float


_resident: dict[str, Resident] = {}
_lock = threading.Lock()


def resident() -> list[dict[str, Any]]:
    """The models this process holds, as JSON-ready rows (kind, name, device, dtype, bytes)."""
    with _lock:
        return [asdict(r) for r in _resident.values()]


def _describe() -> str:
    rows = resident()
    return "; ".join(f"{r['kind']} {r['name']} ({r['device']}, {r['dtype']}, "
                     f"{r['bytes'] / _GB:.2f} GB)" for r in rows) or "none"


def register(kind: str, name: str, modules: list[Any], device: Any) -> Resident:
    """Record a loaded model (``modules``: its torch modules) and log what is resident."""
    total, dtype = 0, "unknown"
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            total += tensor.numel() * tensor.element_size()
            dtype = str(tensor.dtype).removeprefix("torch.")
    entry = Resident(kind, name, str(device), dtype, total, time.time())
    with _lock:
        _resident[f"{kind}:{name}"] = entry
    log.info("resident models: %s", _describe())
    return entry


def estimate_bytes(source: str | Path, *, bytes_per_param: int, stored_bytes_per_param: int = 4,
                   ) -> int | None:
    """Memory the weights of a local model folder need at ``bytes_per_param``; None when the
    size cannot be told before loading (a hub id not downloaded yet)."""
    folder = Path(source)
    if not folder.is_dir():
        return None
    stored = sum(f.stat().st_size for f in folder.rglob("*")
                 if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES))
    if stored == 0:
        return None
    return int(stored * bytes_per_param / stored_bytes_per_param)


def free_bytes(device: Any) -> int | None:
    """Free memory for models on ``device`` (None when unknown)."""
    kind = getattr(device, "type", str(device))
    if kind == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(kind: str, name: str, need_bytes: int | None, device: Any, *,
               setting: str) -> None:
    """Refuse to load a model that does not fit (see the module docstring).

    Raises:
        ModelUnavailableError: naming the model, what it needs, what is free and what to do.
    """
    if need_bytes is None:
        return
    need = int(need_bytes * MEMORY_HEADROOM)
    budget_gb = get_settings().model_memory_gb
    if budget_gb is not None:
        with _lock:
            held = sum(r.bytes for r in _resident.values())
        available, where = int(budget_gb * _GB) - held, (
            f"MUSESPARK_MODEL_MEMORY_GB={budget_gb:g} less {held / _GB:.2f} GB already resident")
    else:
        free = free_bytes(device)
        if free is None:
            return
        available, where = free, f"free on {device}"
    if need > available:
        raise ModelUnavailableError(
            f"the {kind} model {setting}={name!r} needs about {need / _GB:.2f} GB "
            f"(weights plus {MEMORY_HEADROOM - 1:.0%} working room) but only "
            f"{max(available, 0) / _GB:.2f} GB is {where}; resident: {_describe()}. Use a "
            "smaller model, a GPU with more memory, or run text and pictures on separate "
            "workers (--queues gpu.text / gpu.image).",
            user_message=(f"The {'writing' if kind == 'text' else 'picture'} model does not "
                          "fit in this worker's memory, so I cannot do this right now. The "
                          "bot's operator has been told."))
