"""Checkpoints, RNG state, the prompt artifact and SLURM preemption (docs/ARCHITECTURE.md sections 4 and 9).

Everything written here loads with ``torch.load(..., weights_only=True)``: tensors and plain Python
containers/scalars only, so a checkpoint or artifact from someone else cannot run code when loaded.
Writes go through :func:`pipeline.fileio.atomic_write` (temp file in the same folder, fsync,
``os.replace``, fsync of the folder), so a job killed at any moment leaves either the previous file or
the new one, never a half-written file under a checkpoint name.

Layout of a run folder::

    run_dir/checkpoints/step_00001000.pt   # newest keep_last are kept
    run_dir/checkpoints/.step_00001200.pt.<pid>.<random>.tmp   # only while a write is in flight
"""

from __future__ import annotations

import logging
import pickle
import random
import re
import signal
import subprocess
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.fileio import atomic_write

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
_CKPT_RE = re.compile(r"^step_(\d{8,})\.pt$")

SCHEMA_VERSION = 1
"""Version of the artifact layout; bump it when a field changes meaning or shape."""
ARTIFACT_KIND = "pipeline.prompt_artifact"

# Metadata fields that must agree for an artifact to be usable by a run (prompt shapes are compared too).
COMPAT_FIELDS = ("backbone.arch", "backbone.pretrained", "prompts.type")


class CheckpointError(RuntimeError):
    """A checkpoint or artifact file is missing, truncated or otherwise unreadable."""


class UnsafeCheckpointError(CheckpointError):
    """A file holds pickled objects beyond tensors and plain containers; it was not loaded."""


def _torch_save(obj: Any, path: Path) -> Path:
    check_loadable(obj)
    return atomic_write(path, lambda f: torch.save(obj, f))


# Exact types torch's weights_only unpickler accepts besides tensors. Exact, because subclasses such as
# numpy.float64 (a float) or collections.defaultdict (a dict) pickle by reference and would be refused.
_PLAIN = {str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device, torch.Size}
_MAPPINGS = {dict, OrderedDict}
_SEQUENCES = {list, tuple, set}


def check_loadable(obj: Any, where: str = "state") -> None:
    """Raise ``TypeError`` naming the first value that ``weights_only=True`` loading would reject.

    Checked at save time so a bad value (a numpy array, a config object) fails at the first checkpoint
    rather than at resume time hours later.
    """
    kind = type(obj)
    if isinstance(obj, Tensor) or kind in _PLAIN:
        return
    if kind in _MAPPINGS:
        for k, v in obj.items():
            if type(k) not in _PLAIN:
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} is not loadable with weights_only")
            check_loadable(v, f"{where}[{k!r}]")
        return
    if kind in _SEQUENCES:
        for i, v in enumerate(obj):
            check_loadable(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where}: {kind.__module__}.{kind.__qualname__} is not loadable with weights_only=True; "
        "convert it to a tensor, a number, a string or a list/dict of those"
    )


def _load(path: str | Path, map_location: Any = "cpu") -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        # weights_only=True is passed explicitly, so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot override it.
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is long and generic; keep the line that says what was refused.
        lines = [x for x in str(e).splitlines() if x.strip()]
        reason = next((x for x in lines if "unsupported" in x.lower()), lines[0] if lines else type(e).__name__)
        if "global" in reason.lower():  # a reference to a Python callable/class: possibly code
            raise UnsafeCheckpointError(
                f"{path}: refusing to load: it holds pickled objects other than tensors and plain containers "
                f"(possibly code); nothing was executed. {reason.strip()}"
            ) from None
        raise CheckpointError(f"{path}: unreadable (truncated or corrupt): {reason.strip()}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: unreadable (truncated or corrupt): {reason}") from None


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives."""
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint file, oldest first; temp files are not listed."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_RE.match(p.name))]
    return sorted(found)


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Atomically write ``state`` (plus ``"step"``) as ``run_dir/checkpoints/step_{step:08d}.pt``.

    Then prunes: only the newest ``keep_last`` checkpoints up to ``step`` stay. Checkpoints of *later*
    steps are deleted as well: they belong to a timeline that was abandoned by resuming from an earlier
    checkpoint (e.g. after the newest one was corrupt), and keeping them would make the next resume jump
    back onto it. Stale temp files of killed writers are removed. One writer per ``run_dir`` is assumed.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last} must be >= 1")
    if "step" in state and state["step"] != step:
        raise ValueError(f"state['step']={state['step']} disagrees with step={step}")
    path = _torch_save({**state, "step": int(step)}, checkpoint_path(run_dir, step))
    kept = [(s, p) for s, p in list_checkpoints(run_dir) if s <= step]
    for s, p in list_checkpoints(run_dir):
        if s > step:
            log.warning("removing checkpoint %s of an abandoned timeline (newer than step %d)", p, step)
            p.unlink(missing_ok=True)
    for _, p in kept[:-keep_last]:
        p.unlink(missing_ok=True)
    for tmp in path.parent.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``.

    Raises :class:`UnsafeCheckpointError` (nothing executed) for files holding arbitrary pickled objects
    and :class:`CheckpointError` for truncated/corrupt files or files that are not checkpoints.
    """
    state = _load(path, map_location)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path}: not a checkpoint (expected a dict with an integer 'step')")
    return state


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint in ``run_dir`` that loads, or ``None``.

    A newest file that is truncated, corrupt or unsafe is skipped with a logged warning giving the
    reason, and the previous one is tried. Each candidate is fully loaded (prompt-tuning checkpoints are
    small), since a readable zip header does not prove the tensors behind it are complete.
    """
    for step, path in reversed(list_checkpoints(run_dir)):
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", path, e)
            continue
        if state["step"] != step:
            log.warning("skipping checkpoint %s: it holds step %s, not %d", path, state["step"], step)
            continue
        return path
    return None


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """RNG states of Python ``random``, numpy's global RNG, torch CPU and every CUDA device.

    Converted to tensors/ints/lists so the result survives ``weights_only=True`` loading.
    """
    version, mt, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        # uint32 keys widened to int64: torch has no uint32 arithmetic and the values must round-trip.
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states captured by :func:`rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda", [])
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            log.warning("checkpoint has RNG states of %d CUDA devices, this process sees %d; restoring the "
                        "common ones", len(cuda), torch.cuda.device_count())
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)
    elif cuda:
        log.warning("checkpoint has CUDA RNG states but CUDA is not available; they are not restored")


# ----------------------------------------------------------------------------- artifact
@dataclass(frozen=True)
class Artifact:
    """The product of a training stage: prompts θ*, regulator φ* and metadata (docs/ARCHITECTURE.md section 4)."""

    prompts: dict[str, Tensor]
    regulator_state: dict[str, Any]
    metadata: dict[str, Any]


def git_revision(path: str | Path | None = None) -> str:
    """Commit hash of the git checkout holding ``path`` (default: this package), ``-dirty`` appended
    when tracked files have uncommitted changes; ``"unknown"`` outside git or without a git binary."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        # Untracked files are ignored: run folders and caches would otherwise mark every run dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}-dirty" if dirty else (rev or "unknown")


def artifact_metadata(model_cfg_dict: dict[str, Any], prompts: dict[str, Tensor],
                      extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metadata for :func:`save_artifact` from a resolved config dict and the prompt tensors.

    ``model_cfg_dict`` is a ``ModelConfig`` dict (``to_dict``) or a whole run config with a ``model``
    section; the whole dict is stored under ``config``. n_ctx, depth and embed dims come from the tensor
    shapes (``[depth, n_ctx, width]``), which are the truth when ``init_words`` overrides ``n_ctx_text``.
    """
    model = model_cfg_dict["model"] if "backbone" not in model_cfg_dict and "model" in model_cfg_dict \
        else model_cfg_dict
    meta: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "backbone.arch": model["backbone"]["arch"],
        "backbone.pretrained": model["backbone"]["pretrained"],
        "prompts.type": model["prompts"]["type"],
        "prompt_shapes": {k: list(v.shape) for k, v in prompts.items()},
        "config": model_cfg_dict,
        "git_revision": git_revision(),
    }
    for name, t in prompts.items():  # t: [depth, n_ctx, width]
        meta[f"prompts.depth_{name}"], meta[f"prompts.n_ctx_{name}"], meta[f"embed_dim.{name}"] = t.shape
    meta.update(extra or {})
    return meta


def save_artifact(path: str | Path, prompts: dict[str, Tensor], regulator_state: dict[str, Any],
                  metadata: dict[str, Any]) -> Path:
    """Atomically write the prompts, the regulator state_dict and metadata (moved to CPU, detached)."""
    payload = {
        "kind": ARTIFACT_KIND,
        "schema_version": SCHEMA_VERSION,
        "prompts": {k: v.detach().cpu().contiguous() for k, v in prompts.items()},
        "regulator": {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in regulator_state.items()},
        "metadata": {**metadata, "schema_version": SCHEMA_VERSION},
    }
    return _torch_save(payload, Path(path))


def load_artifact(path: str | Path) -> Artifact:
    """Load an artifact (``weights_only=True``); refuses other files and newer schema versions."""
    data = _load(path)
    if not isinstance(data, dict) or data.get("kind") != ARTIFACT_KIND:
        raise CheckpointError(f"{path}: not a prompt artifact (missing kind={ARTIFACT_KIND!r})")
    _check_schema(data.get("schema_version"), str(path))
    return Artifact(prompts=data["prompts"], regulator_state=data["regulator"], metadata=data["metadata"])


def _check_schema(version: Any, where: str) -> None:
    if not isinstance(version, int):
        raise ValueError(f"{where}: artifact has no valid schema_version ({version!r})")
    if version > SCHEMA_VERSION:
        raise ValueError(f"{where}: artifact schema version {version} is newer than this code supports "
                         f"({SCHEMA_VERSION}); update the pipeline package to load it")


def check_compatible(metadata: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming every field where an artifact does not fit the current run.

    ``expected`` is usually :func:`artifact_metadata` of the current run; the fields compared are
    ``COMPAT_FIELDS`` and the shape of every prompt tensor, each only when present in ``expected``.
    """
    _check_schema(metadata.get("schema_version"), "metadata")
    problems = []
    for key in COMPAT_FIELDS:
        if key in expected and metadata.get(key) != expected[key]:
            problems.append(f"artifact was made for {key}={metadata.get(key)!r} but this run uses {expected[key]!r}")
    have, want = metadata.get("prompt_shapes", {}), expected.get("prompt_shapes")
    if want is not None:
        for name in sorted(set(have) | set(want)):
            a = tuple(have[name]) if name in have else None
            b = tuple(want[name]) if name in want else None
            if a != b:
                problems.append(f"prompts.{name} shape {_shape(a)} != {_shape(b)}")
    if problems:
        raise ValueError("incompatible artifact: " + "; ".join(problems))


def _shape(s: tuple | None) -> str:
    return "(absent)" if s is None else str(s)


# ----------------------------------------------------------------------------- preemption
class PreemptionHandler:
    """Turn SIGTERM / SIGUSR1 (SLURM preemption or time limit) into a flag instead of death.

    Use around the training loop; check ``.requested`` each step, then save a checkpoint and exit 0 so
    the requeued job resumes. With several ranks, all-reduce the flag (max) so every rank stops at the
    same step. Previous handlers are restored on exit. Signal handlers can only be installed from the
    main thread; elsewhere a warning is logged and nothing is installed.
    """

    def __init__(self, signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGUSR1)):
        self.signals = tuple(signals)
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        # Only set attributes here: logging or printing from a signal handler can hit a re-entrant write
        # on a buffered stream the interrupted code was using. The loop logs when it sees the flag.
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> PreemptionHandler:
        try:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError as e:  # not the main thread
            self.__exit__(None, None, None)
            log.warning("preemption handler not installed (%s); SIGTERM will end the job without a checkpoint", e)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        if self.requested:
            log.warning("stopped by %s (preemption); the job can be requeued", self.signal_name)
