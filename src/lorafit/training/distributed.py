"""Several processes, one run: joining early, agreement between ranks, FSDP settings.

``torchrun`` and ``accelerate launch`` start one process per device with ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` in the environment; ``transformers.Trainer`` (through
accelerate) then wraps the model in DDP or FSDP. Which process this is comes from accelerate's
``PartialState`` (``is_main_process``, ``num_processes``, ``local_main_process_first`` ...),
which Trainer builds too. What neither does, and this module does, is make the processes agree
*before* the Trainer exists:

* one run folder: rank 0 picks it (a timestamped name, or checks ``output_dir``) and sends it
  to the others, so every rank writes checkpoints into the same folder and a refusal (folder
  taken) stops every rank with the same message (:func:`decide_on_main`);
* the same data: a fingerprint check proves every rank holds the same examples in the same
  packed rows (:func:`check_same_on_all_ranks`; the sampler, seeded alike, then orders them alike);
* a clean exit: :func:`shutdown` leaves the group without gloo aborting the process.

Loading an adapter into a sharded model is :func:`lorafit.adapters.files.load_adapter_sharded`.
Without a launcher every function here is a no-op or a plain call.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object

from lorafit.config import RunConfig
from lorafit.errors import LorafitError
from lorafit.models.device import has_accelerator

T = TypeVar("T")

_GLOO_DRAIN_SECONDS = 0.2  # see shutdown()

# What ``lorafit train --fsdp`` sets (TrainingArguments keys): FSDP2, which shards every
# parameter on its own, so frozen base weights and trainable LoRA matrices can share a wrapped
# unit (FSDP1's flat parameters need use_orig_params for that); one unit per decoder layer
# (the model's ``_no_split_modules``); a full state dict for saving, from which the adapter is
# taken on rank 0.
FSDP_SETTINGS: dict[str, Any] = {
    "fsdp": True,
    "fsdp_config": {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "reshard_after_forward": True,
        "state_dict_type": "FULL_STATE_DICT",
    },
}


def _launched_processes() -> int:
    # Before the group exists: accelerate's PartialState would create it on first use (with
    # default settings), so the launcher's own variable is read instead.
    return int(os.environ.get("WORLD_SIZE", "1"))


def _joined() -> bool:
    """Whether this process is in a process group (so PartialState() will not create one)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _state() -> PartialState:
    # Built already by join_processes or TrainingArguments. Should the caller have made the
    # group itself, accelerate would see no distributed run on a CPU-only machine unless told cpu.
    return PartialState(cpu=not has_accelerator())


def init_distributed(
    *, cpu: bool, backend: str | None = None, timeout_s: int = 1800, deepspeed: bool = False
) -> None:
    """Join the process group now, when launched with ``WORLD_SIZE > 1``.

    The group is accelerate's ``PartialState``, built as ``TrainingArguments`` builds it (same
    backend choice: gloo on CPU, nccl on CUDA), which later finds it initialised and reuses it.
    Joining early lets the ranks agree on the run folder and data before the Trainer exists.
    """
    if _launched_processes() <= 1 or _joined():
        return
    kwargs: dict[str, Any] = {"timeout": timedelta(seconds=timeout_s)}
    if backend:
        kwargs["backend"] = backend
    if deepspeed:
        # As TrainingArguments does: the env var makes accelerate start DeepSpeed's group.
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(cpu=cpu, **kwargs)
    finally:
        if deepspeed:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]


def shutdown(*, wait_for_all: bool) -> None:
    """Leave the process group at the end of a run. ``wait_for_all`` (after a successful run)
    first waits for every rank, so no process tears down gloo while another still uses it; a
    process exiting with its group alive can abort in C++ ("terminate called ...")."""
    if not _joined():
        return
    state = _state()
    if wait_for_all:
        state.wait_for_everyone()
    state.destroy_process_group()
    # gloo's worker thread frees each finished collective after the caller has been woken, and
    # a collective's tensors can hold the last reference to a Python object, so that thread may
    # still be waiting for the GIL here. Should the interpreter start finalising first, the
    # thread is forced to exit from inside a destructor and C++ aborts the whole process
    # ("terminate called without an active exception", SIGABRT after a successful run; seen
    # about once in 20 runs of tests/training/dist_worker.py). Sleeping releases the GIL to it.
    time.sleep(_GLOO_DRAIN_SECONDS)


def decide_on_main(fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 only; every rank returns its result.

    A :class:`LorafitError` raised on rank 0 is raised on every rank with the same message, so
    a refusal (an output folder already in use, say) stops the whole job instead of leaving the
    other ranks waiting. The result must be picklable.
    """
    if not _joined():
        return fn()
    payload: list[Any] = [None]
    error: LorafitError | None = None
    if _state().is_main_process:
        try:
            payload[0] = ("ok", fn())
        except LorafitError as e:
            error = e
            payload[0] = ("error", str(e))
    broadcast_object_list(payload, from_process=0)
    status, value = payload[0]
    if error is not None:
        raise error
    if status == "error":
        raise LorafitError(value)
    return value


def check_same_on_all_ranks(value: str, what: str) -> None:
    """Raise on every rank unless every rank passes the same ``value`` (a short string)."""
    if not _joined() or not _state().use_distributed:
        return
    values = gather_object([value])  # one per rank, in rank order
    if len(set(values)) > 1:
        groups: dict[str, list[int]] = {}
        for r, v in enumerate(values):
            groups.setdefault(v, []).append(r)
        detail = "; ".join(f"ranks {ranks}: {v[:12]}" for v, ranks in groups.items())
        raise LorafitError(
            f"the processes built different {what} ({detail}). Every machine must see the same "
            "data files, tokenizer and config: check that the files are identical on every machine "
            "(or on a shared filesystem)."
        )


def join_processes(cfg: RunConfig) -> None:
    """Under ``torchrun`` / ``accelerate launch``: join the process group before anything is
    decided, so that rank 0 can choose the run folder for all. Refuses FSDP where accelerate
    would silently ignore it (CPU)."""
    tc = cfg.training_config
    cpu = bool(tc.get("use_cpu")) or not has_accelerator()
    if tc.get("fsdp") and cpu:
        refuse_cpu_fsdp()
    if tc.get("fsdp") and _launched_processes() == 1:
        raise LorafitError(
            "training_config.fsdp shards the model over the processes of a launch, and this is a single "
            "process (accelerate would train unsharded): torchrun --nproc_per_node N -m lorafit train ..."
        )
    if ds := tc.get("deepspeed"):
        import importlib.util

        if isinstance(ds, str) and not Path(ds).is_file():
            raise LorafitError(f"training_config.deepspeed: the DeepSpeed config {ds} does not exist")
        if importlib.util.find_spec("deepspeed") is None:
            raise LorafitError(
                "training_config.deepspeed needs the deepspeed package (CUDA machines): pip install deepspeed"
            )
    if _launched_processes() > 1 and isinstance(cfg.model.device_map, str):
        raise LorafitError(
            f"model.device_map: {cfg.model.device_map!r} spreads one model over every device, but under "
            f"torchrun each of the {_launched_processes()} processes loads its own copy for its own device. "
            "Leave device_map null (DDP), or add --fsdp to shard the model over the processes."
        )
    init_distributed(
        cpu=cpu,
        backend=tc.get("ddp_backend"),
        timeout_s=int(tc.get("ddp_timeout") or 1800),
        deepspeed=bool(tc.get("deepspeed")),
    )


def refuse_cpu_fsdp() -> None:
    """FSDP asked for on CPU: refused, because accelerate would quietly run DDP instead."""
    import accelerate

    raise LorafitError(
        f"training_config.fsdp needs GPUs (or other accelerators): accelerate {accelerate.__version__} "
        "turns FSDP on only for CUDA/XPU/NPU/HPU-type devices, and on CPU it would silently run "
        "plain DDP with the whole model on every process. On CPU, drop --fsdp and launch with "
        "torchrun (DDP); to shard the model, run on GPUs."
    )
