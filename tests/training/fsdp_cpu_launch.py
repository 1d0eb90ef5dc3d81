"""``python -m lorafit`` with accelerate's FSDP gate lifted on CPU, for test_distributed.py.

accelerate 1.15 selects FSDP only for accelerator devices (CUDA, XPU, NPU, ...); on CPU it keeps
DDP and ignores the FSDP plugin, which is why ``lorafit train --fsdp`` refuses CPU. torch's FSDP2
itself runs on CPU over gloo, so this launcher marks the CPU run as FSDP once accelerate has set
it up, and lets lorafit's refusal pass. Everything else is the code a GPU run goes through:
transformers' Trainer, accelerate's ``fully_shard`` preparation, its full-state-dict gathering on
save, its FSDP optimizer checkpoint, and lorafit's adapter save and sharded resume.
"""

from __future__ import annotations

import sys

import accelerate.state as acc_state
from accelerate.utils import DistributedType

import lorafit.training.distributed as lf_dist
from lorafit.cli import main

_init = acc_state.AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs) -> None:
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.fsdp_plugin = fsdp_plugin
        self.distributed_type = DistributedType.FSDP
        # AcceleratorState copies PartialState's fields on every construction: set it there too.
        acc_state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


acc_state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu
lf_dist.refuse_cpu_fsdp = lambda: None

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
