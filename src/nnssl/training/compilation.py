"""`nnssl_train --compile`: torch.compile of the method's forward, and a count of what compiled.

Off by default until measured on a GPU (`benchmarks/gpu_check.py` measures eager against
compiled). Shared by the trainer and the GPU check, so the benchmark times what the flag does.
"""

from __future__ import annotations

import types

import torch

from nnssl.methods.base import PretrainingMethod


def compile_method(method: PretrainingMethod, backend: str = "inductor") -> PretrainingMethod:
    """`torch.compile` the method's forward in place (`nnssl_train --compile`) and return it.

    The compiled region is `method.forward`, what `training_output` calls after drawing the
    masks on the host: the mask samplers (Python, hashed seeds) stay eager, the tensor work of
    the encoders, predictor / decoder and loss is traced. In place (`nn.Module.compile`), so the
    state-dict keys are unchanged (no `_orig_mod.` prefix) and checkpoints load into an
    uncompiled run. Shapes are automatic-dynamic: the first step compiles with static shapes;
    I-JEPA's context and target lengths change from step to step, and the first change of each
    recompiles with that length symbolic, so I-JEPA compiles at most three times and then no
    more (measured on the CPU: 3 graphs by step 3, none after, over 13 steps of Tiny at 64³);
    MAE's mask counts are exact, one compile. Validation (eval mode, no_grad) adds one graph.

    The sparse ResEnc student (`ResEncTokenEncoder` called with `keep`) replaces its norms'
    `forward` and registers hooks on every call, which invalidates dynamo's guards: measured, it
    recompiled on every step until dynamo's recompile limit. Its sparse calls therefore run
    eagerly; its dense calls (the teacher) are compiled."""
    from nnssl.models.sparse_resenc import ResEncTokenEncoder

    for module in method.modules():
        if isinstance(module, ResEncTokenEncoder):
            module.forward = types.MethodType(_forward_sparse_eagerly, module)
    method.compile(backend=backend)
    return method


@torch.compiler.disable
def _eager_forward(encoder: torch.nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return type(encoder).forward(encoder, x, keep)


def _forward_sparse_eagerly(self: torch.nn.Module, x: torch.Tensor, keep: torch.Tensor | None = None
                            ) -> torch.Tensor:
    if keep is None:
        return type(self).forward(self, x)
    return _eager_forward(self, x, keep)


def compiled_graph_count() -> int:
    """Graphs dynamo has compiled in this process so far (each compile and recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
