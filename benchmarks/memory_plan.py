"""The memory planner's predicted step peak against the measured one, per model size and setting.

Each setting trains for ``--steps`` optimizer steps (2 by default: AdamW's moments exist from the
first step on, so the second step holds everything the planner counts) in its own process, with
``lorafit.training.train`` as a user runs it on the bench's model and chat data
(:mod:`lorafit.bench`). The process's peak resident memory (VmHWM) is reset when training
begins, so the step's peak is measured apart from loading's; both are printed, with the planner's
one-line prediction from the same run (made before its model was loaded)::

    PYTHONPATH=src python benchmarks/memory_plan.py --size small
    PYTHONPATH=src python benchmarks/memory_plan.py --size phi3-mini --layers 2
    PYTHONPATH=src python benchmarks/memory_plan.py --size phi3-mini --layers 4 --settings none,all,qlora
    PYTHONPATH=src python benchmarks/memory_plan.py --size phi3-mini --layers 32 \\
        --settings none,quarter,qlora,plan:16GB,plan:12GB,plan:8GB

Settings: ``none`` (no layer recomputed), ``quarter`` (a quarter of them), ``all`` (every one),
``qlora`` (the 4-bit NF4 base, every layer recomputed), ``plan:SIZE`` (the planner chooses
for ``training_config.max_memory: SIZE``) and ``nf4`` (the 4-bit base alone), joined with ``+``:
``nf4+plan:8GB`` lets the planner choose for a QLoRA run. Phi-3-mini's widths load as its 3.8 B
parameters would (bf16 kept, products widened on CPUs without bf16 instructions), as in ``lorafit bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

NF4 = {
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_compute_dtype": "bfloat16",
    "bnb_4bit_use_double_quant": True,
}
SETTINGS: dict[str, dict[str, Any]] = {
    "none": {"training_config": {"checkpoint_layers": 0}},
    "quarter": {"training_config": {"checkpoint_layers": 0.25}},
    "all": {"training_config": {"gradient_checkpointing": True}},
    "qlora": {"model": {"quantization": NF4}, "training_config": {"gradient_checkpointing": True}},
    "nf4": {"model": {"quantization": NF4}},  # the 4-bit base alone: combine with plan:SIZE
}


def setting(name: str) -> dict[str, Any]:
    """The run's overrides for ``name``: one of SETTINGS, ``plan:SIZE``, or several joined by ``+``."""
    merged: dict[str, dict[str, Any]] = {}
    for part in name.split("+"):
        if part.startswith("plan:"):
            values = {"training_config": {"max_memory": part.split(":", 1)[1]}}
        elif part in SETTINGS:
            values = SETTINGS[part]
        else:
            raise SystemExit(
                f"--settings: unknown {part!r}; expected {', '.join(SETTINGS)}, plan:SIZE or A+B"
            )
        for section, entries in values.items():
            merged[section] = {**merged.get(section, {}), **entries}
    return merged


def _status(field: str) -> int:
    """A /proc/self/status memory field, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def worker(spec_path: str) -> int:
    """One training run as the spec says; writes the peaks and the planner's line next to it."""
    from transformers import TrainerCallback

    from lorafit.bench.settings import LORA, BenchSettings
    from lorafit.bench.workload import training_config
    from lorafit.config import build_config
    from lorafit.training import train

    spec = json.loads(Path(spec_path).read_text())
    settings = BenchSettings(**spec["settings"])
    if settings.size == "phi3-mini":  # a cut of it trains as the 3.8 B model would
        os.environ["LORAFIT_WIDE_ABOVE"] = "0"
    os.environ["LORAFIT_CACHE"] = spec["paths"]["cache"]
    run = {
        "model": {
            "name_or_path": spec["paths"]["model"],
            "torch_dtype": "bfloat16",
            "attn_implementation": "sdpa",
        },
        "data": {"train": spec["paths"]["train"], "max_length": settings.max_length, "eval_prompts": 0},
        "peft_config": dict(LORA),
        "training_config": training_config(settings, spec["run_dir"]),
    }
    for section, values in setting(spec["setting"]).items():
        run[section] = {**run[section], **values}
    peaks: dict[str, float] = {}

    class Peaks(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            peaks["load_peak"] = _status("VmHWM")
            peaks["before_steps"] = _status("VmRSS")
            # file-backed pages (a checkpoint read through mmap) are reclaimable; anonymous ones are not
            peaks["before_steps_file"] = _status("RssFile")
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the steps' peak from here

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            peaks["_began"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            # each optimizer step's wall time; the table shows the last (the first may fault pages in)
            peaks.setdefault("step_seconds", []).append(time.perf_counter() - peaks.pop("_began"))

    lines: list[str] = []

    def echo(*parts: Any) -> None:
        lines.append(" ".join(str(p) for p in parts))
        print(*parts, file=sys.stderr)

    train(build_config(run), callbacks=[Peaks()], echo=echo)
    plan = next((line for line in lines if line.startswith("memory: ")), "")
    match = re.search(r"memory: peak ([0-9.]+) GB", plan)
    result = {
        **peaks,
        "end_file": _status("RssFile"),
        "step_peak": _status("VmHWM"),
        "plan": plan,
        "tokens_per_step": settings.batch_size * settings.max_length,
        # 16-bit weights stay mapped from the checkpoint; a 4-bit base is a copy in anonymous memory
        "weights_file": 0
        if "quantization" in run["model"]
        else sum(f.stat().st_size for f in Path(spec["paths"]["model"]).glob("*.safetensors")),
        "predicted": float(match.group(1)) * 1e9 if match else None,
    }
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def run_setting(out: Path, name: str, paths: dict[str, str], settings: Any) -> dict[str, Any]:
    import dataclasses

    tag = re.sub(r"[^A-Za-z0-9]+", "-", name)
    spec = {
        "setting": name,
        "paths": paths,
        "settings": dataclasses.asdict(settings),
        "run_dir": str(out / "runs" / tag),
        "result": str(out / f"{tag}.json"),
    }
    spec_path = out / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log = out / f"{tag}.log"
    with open(log, "w", encoding="utf-8") as f:
        code = subprocess.call([sys.executable, __file__, "--worker", str(spec_path)], stdout=f, stderr=f)
    if code != 0:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-20:])
        return {"error": f"exit {code}; end of {log}:\n{tail}"}
    return json.loads(Path(spec["result"]).read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", choices=["small", "phi3-mini"])
    parser.add_argument(
        "--layers", type=int, default=None, help="decoder layers (a cut of the size's widths)"
    )
    parser.add_argument("--settings", default="none,quarter,all,qlora")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--out", default="memory-plan-out")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)

    from lorafit.bench.settings import BenchSettings
    from lorafit.bench.workload import prepare_assets

    settings = BenchSettings.from_options(
        size=args.size, layers=args.layers, steps=args.steps, warmup=0, max_length=args.max_length
    )
    out = Path(args.out).resolve() / f"{args.size}-{settings.model_sizes['num_hidden_layers']}layers"
    out.mkdir(parents=True, exist_ok=True)
    paths = prepare_assets(out.parent / f"assets-{args.size}", settings)
    print(
        f"{settings.model_name}: {settings.batch_size} x {settings.max_length} tokens, {args.steps} steps; "
        "peaks in GB (10^9 bytes)"
    )
    print(
        f"{'setting':<14} {'predicted':>9} {'measured':>9} {'error':>7} {'load peak':>9} "
        f"{'tokens/s':>8}  plan"
    )
    for name in [s.strip() for s in args.settings.split(",") if s.strip()]:
        r = run_setting(out, name, paths, settings)
        if "error" in r:
            print(f"{name:<14} failed: {r['error']}")
            continue
        predicted, measured = r["predicted"], r["step_peak"]
        error = f"{100 * (predicted - measured) / measured:+.1f}%" if predicted else "-"
        # row tokens (packed rows are ~97% full) over the last step's wall time
        speed = r["tokens_per_step"] / r["step_seconds"][-1]
        # The weights are read through mmap: their pages count in RSS only while resident, and a
        # machine short of memory drops some, so such a run's peak reads low. Flag it.
        # (the libraries' own pages, ~0.17 GB, may be dropped first, so allow 5%)
        dropped = r["end_file"] < 0.95 * r["weights_file"]
        print(
            f"{name:<14} {(predicted or 0) / 1e9:9.2f} {measured / 1e9:9.2f} {error:>7} "
            f"{r['load_peak'] / 1e9:9.2f} {speed:8.2f}  "
            f"{'(weights paged out: peak reads low) ' if dropped else ''}"
            f"{r['plan'].removeprefix('memory: ')}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
