"""One rank of a real 2-process gloo job on CPU, started by ``torchrun`` from test_distributed.py.

First the agreement helpers of ``lorafit.training.distributed`` run between the two ranks (each rank
writes what it saw to ``agreement-rank<N>.json``). Then FSDP2: a tiny Phi-3 with lorafit LoRA
layers is sharded with ``fully_shard`` (one unit per decoder layer, each mixing frozen base
weights and trainable LoRA matrices, plus the root), trained with non-reentrant gradient
checkpointing, and compared step by step with an unsharded copy that trains on the whole batch
in this same process. The adapter is then saved the way Trainer saves under FSDP2 (a full state
dict gathered by ``get_model_state_dict``, rank 0 writes) and loaded back into a freshly sharded
model with ``load_adapter_sharded``. Rank 0 writes those findings to ``fsdp.json``. The output
folder is the first argument.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from lorafit.adapters import LoraConfig, apply_lora
from lorafit.adapters.files import adapter_state_dict, load_adapter_sharded, save_adapter
from lorafit.errors import LorafitError
from lorafit.training import distributed as lf_dist

from tiny import tiny_phi3  # tests/ is on PYTHONPATH (test_distributed's launcher)

STEPS = 3


def lora_model(seed: int) -> torch.nn.Module:
    model = tiny_phi3(seed=0, layers=2)  # the same base weights on every rank
    model.config.use_cache = False  # as Trainer runs it; the cache is off under checkpointing anyway
    torch.manual_seed(seed)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    model.gradient_checkpointing_enable({"use_reentrant": False})
    return model.train()


def shard(model: torch.nn.Module) -> torch.nn.Module:
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def local_numel(model: torch.nn.Module) -> int:
    return sum(p.to_local().numel() for p in model.parameters())


def check_agreement(rank: int, out: Path) -> None:
    found: dict[str, object] = {}
    # Rank 0 decides and every rank gets its answer (each would compute its own otherwise).
    found["decided"] = lf_dist.decide_on_main(lambda: f"picked by {PartialState().process_index}")

    def refuse() -> str:
        raise LorafitError("folder taken")

    try:  # a refusal on rank 0 reaches every rank with the same message
        lf_dist.decide_on_main(refuse)
    except LorafitError as e:
        found["refusal"] = str(e)
    try:  # different rows on the ranks are caught on every rank
        lf_dist.check_same_on_all_ranks(f"rows-{rank}", "training rows")
    except LorafitError as e:
        found["mismatch"] = str(e)
    lf_dist.check_same_on_all_ranks("same", "training rows")
    with PartialState().local_main_process_first():  # as lorafit fills its data cache
        found["saw_first"] = (out / "first").exists()  # only rank 1 sees rank 0's file
        (out / "first").touch()
    (out / f"agreement-rank{rank}.json").write_text(json.dumps(found))


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    lf_dist.init_distributed(cpu=True)  # as lorafit train joins: accelerate's PartialState, over gloo
    rank, world = dist.get_rank(), dist.get_world_size()
    check_agreement(rank, out)

    reference = lora_model(seed=1)
    model = shard(copy.deepcopy(reference))
    total = sum(p.numel() for p in reference.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ref_opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2)

    # (world * 2, 16) with every label valid: the mean of the equal halves' mean losses is the
    # whole batch's mean loss, and FSDP averages gradients over ranks, so both runs match.
    ids = torch.randint(3, 128, (world * 2, 16), generator=torch.Generator().manual_seed(7))
    mine = ids[rank * 2 : (rank + 1) * 2]
    losses, ref_losses = [], []
    for _ in range(STEPS):
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)

        ref_loss = reference(input_ids=ids, labels=ids).loss
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        ref_losses.append(ref_loss.item())

    # Trainer's FSDP2 save: accelerate gathers a full state dict (rank 0 gets it), lorafit takes
    # the adapter from it.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    folder = out / "adapter"
    if rank == 0:
        save_adapter(model, folder, state_dict=state)
    dist.barrier()

    # Resume's FSDP2 load: a new sharded model with other LoRA weights takes the saved ones.
    fresh = shard(lora_model(seed=2))
    load_adapter_sharded(fresh, folder)
    fresh.eval()
    reference.eval()
    with torch.no_grad():
        logits_diff = (fresh(input_ids=mine).logits - reference(input_ids=mine).logits).abs().max().item()
    diffs = torch.tensor([logits_diff])
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)

    if rank == 0:
        saved = adapter_state_dict(reference)
        written = load_file(str(folder / "adapter_model.safetensors"))
        report = {
            "losses": losses,
            "ref_losses": ref_losses,
            "local_numel": local_numel(model),
            "total_numel": total,
            "frozen_and_trainable_in_one_unit": any(
                p.requires_grad for p in model.model.layers[0].parameters()
            )
            and any(not p.requires_grad for p in model.model.layers[0].parameters()),
            "adapter_keys_match": sorted(written) == sorted(saved),
            "adapter_max_diff": max((written[k] - saved[k]).abs().max().item() for k in saved),
            "reloaded_logits_max_diff": diffs.item(),
        }
        (out / "fsdp.json").write_text(json.dumps(report))
    lf_dist.shutdown(wait_for_all=True)  # rank 1 must not leave while rank 0 still writes


if __name__ == "__main__":
    main()
