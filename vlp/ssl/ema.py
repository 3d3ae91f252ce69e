"""The EMA teacher / momentum encoder shared by MoCo, BYOL and DINO.

``teacher = m * teacher + (1 - m) * student`` after every optimiser step, for parameters and floating-point
buffers (integer buffers such as BatchNorm's ``num_batches_tracked`` are copied). The teacher is a frozen deep copy
of the student modules, owned by the objective (so it is moved, wrapped, checkpointed and broadcast with it) but
never given to the optimiser.

Data parallel: every rank applies the same update to identical weights, so teachers stay identical without
communication (DDP and DeepSpeed ZeRO-1/2 keep whole parameters on every rank). Under DeepSpeed ZeRO-3 the
parameters are partitioned and the update is refused with a clear error (:func:`check_not_zero3`).

Low precision: when the teacher's parameters are not fp32 (DeepSpeed casts the whole module to bf16/fp16), an
update of (1 - m) ~ 4e-3 of a difference is below bf16's resolution and the teacher would stop moving; the
average is then kept in an fp32 shadow copy and the teacher's parameters are rounded from it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from vlp.ssl.backbone import check_not_zero3


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` that receives no gradients."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class EMATeacher(nn.Module):
    """Frozen copies of named student modules, updated as their exponential moving average."""

    def __init__(self, students: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.copies = nn.ModuleDict({name: frozen_copy(m) for name, m in students.items()})
        self._shadow: dict[str, list[torch.Tensor]] = {}

    def __getitem__(self, name: str) -> nn.Module:
        return self.copies[name]

    @torch.no_grad()
    def update(self, students: Mapping[str, nn.Module], momentum: float) -> None:
        """``teacher <- momentum * teacher + (1 - momentum) * student`` for every parameter and float buffer."""
        if set(students) != set(self.copies):
            raise ValueError(f"EMA update needs the students {sorted(self.copies)}, got {sorted(students)}")
        for name, student in students.items():
            teacher = self.copies[name]
            check_not_zero3(student)
            t_params, s_params = list(teacher.parameters()), list(student.parameters())
            if len(t_params) != len(s_params):
                raise ValueError(f"teacher {name!r} has {len(t_params)} parameters, its student {len(s_params)}")
            low = [i for i, t in enumerate(t_params) if t.dtype != torch.float32]
            if low and name not in self._shadow:
                self._shadow[name] = [t_params[i].detach().float().clone() for i in low]
            shadows = dict(zip(low, self._shadow.get(name, [])))
            for i, (t, s) in enumerate(zip(t_params, s_params)):
                if i in shadows:
                    shadow = shadows[i]
                    shadow.mul_(momentum).add_(s.detach().float(), alpha=1.0 - momentum)
                    t.copy_(shadow)
                else:
                    t.mul_(momentum).add_(s.detach().to(t.dtype), alpha=1.0 - momentum)
            for tb, sb in zip(teacher.buffers(), student.buffers()):
                if tb.is_floating_point():
                    tb.mul_(momentum).add_(sb.to(tb.dtype), alpha=1.0 - momentum)
                else:
                    tb.copy_(sb)
