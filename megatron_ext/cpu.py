"""Run unmodified megatron-core on CPU processes over gloo.

megatron-core assumes CUDA in four places (ARCHITECTURE.md, "Facts"): allocations on
``torch.cuda.current_device()``, tensor factories with a hard-coded ``device="cuda"``,
``param.type() == 'torch.cuda.FloatTensor'`` checks in the optimizers, and the CUDA RNG
tracker; plus ``pin_memory=True`` host tensors (RoPE's per-CP-rank slice), which need CUDA.
``cpu_mode()`` handles them all for the duration of a run, so the CPU rehearsal
executes the same model, schedule, DDP and distributed-optimizer code as a GPU job.
Without Transformer Engine the distributed optimizer wraps torch's Adam, which megatron's
checkpoint loading mishandles; two small patches (``_torch_adam_checkpoint_patches``) fix that.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
# Tensor.type() strings the optimizers compare against CUDA names.
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _is_gpu_device(device: Any) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):  # Module.to(False): no device
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    """Maps every CUDA device argument to the CPU, drops ``pin_memory`` (it needs CUDA) and
    makes CPU tensors pass CUDA type checks."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_gpu_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):  # page-locked host memory for CUDA copies (RoPE under CP)
            kwargs["pin_memory"] = False
        if func in (torch.Tensor.cuda,):
            return args[0]
        if func is torch.Tensor.to:
            args = tuple(_CPU if _is_gpu_device(a) else a for a in args)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """Stands in for megatron's CudaRNGStatesTracker: named states of the CPU generator.

    On a GPU, ``fork()`` swaps the CUDA generator so TP ranks draw different dropout masks
    while the CPU generator is untouched; on CPU the only generator is the CPU one, so it is
    the one swapped.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_ or name in self.states_:
            raise ValueError(f"rng state {name!r} or seed {seed} already added")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _rerun_on_cpu(backward: Any) -> Any:
    """megatron's ``CheckpointFunction.backward`` reruns the checkpointed layers. A torch
    function mode is off while its handler runs, and ``torch.autograd.backward`` goes through
    the handler, so without this the rerun would build CUDA tensors (its causal mask)."""
    def rerun(ctx, *grads):  # type: ignore[no-untyped-def]
        with _CudaToCpu():
            return backward(ctx, *grads)
    return staticmethod(rerun)


def _install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def _torch_adam_checkpoint_patches() -> dict[str, Any]:
    """DistributedOptimizer methods that handle torch's Adam in checkpoints.

    Without Transformer Engine or Apex (so on CPU) the distributed optimizer wraps torch's
    Adam, whose per-parameter state has a ``step`` that FusedAdam keeps elsewhere. In
    megatron-core 0.16.1 that breaks loading a distributed checkpoint three ways:
    ``state_dict()`` of a never-stepped optimizer asserts that a ``step`` exists, restoring
    the parameter state expects ``step`` among the loaded tensors (it comes from the param
    groups), and that restored ``step`` is one tensor shared by all parameters.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    state_dict = DistributedOptimizer.state_dict
    set_states = DistributedOptimizer._set_main_param_and_optimizer_states

    def state_dict_of_stepped_adam(self):  # type: ignore[no-untyped-def]
        if not self.optimizer.state:  # megatron's zero-gradient step; the load overwrites it
            self._init_optimizer_states_with_dummy_values()
        return state_dict(self)

    def set_states_but_step(self, model_param, tensors):  # type: ignore[no-untyped-def]
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        step = state.pop("step", None)
        try:
            set_states(self, model_param, tensors)
        finally:
            if step is not None:  # megatron gave every parameter the same tensor, which
                state["step"] = step.clone()  # torch's Adam would then advance once per param

    return {"state_dict": state_dict_of_stepped_adam,
            "_set_main_param_and_optimizer_states": set_states_but_step}


@contextlib.contextmanager
def cpu_mode() -> Iterator[None]:
    """Everything megatron-core does inside this block runs on the CPU."""
    replacements = {
        "current_device": lambda: 0,  # device 0 is mapped to the CPU by _CudaToCpu
        "synchronize": lambda device=None: None,  # CPU ops are synchronous
    }
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.tensor_parallel import random as megatron_random
    from megatron.core.tensor_parallel.random import CheckpointFunction

    # Activation recomputation saves and restores the "CUDA" generator around the rerun.
    rng = {"_get_cuda_rng_state": lambda *args, **kwargs: torch.get_rng_state(),
           "_set_cuda_rng_state": lambda state, *args, **kwargs: torch.set_rng_state(state)}
    rerun = {"backward": _rerun_on_cpu(CheckpointFunction.backward)}
    patches = [(torch.cuda, replacements), (megatron_random, rng),
               (DistributedOptimizer, _torch_adam_checkpoint_patches()),
               (CheckpointFunction, rerun)]
    # getattr_static: a staticmethod comes back as itself, so restoring it keeps it static.
    saved = [(owner, {name: inspect.getattr_static(owner, name) for name in names})
             for owner, names in patches]
    for owner, stand_ins in patches:
        for name, stand_in in stand_ins.items():
            setattr(owner, name, stand_in)
    _install_rng_tracker()
    try:
        with _CudaToCpu():
            yield
    finally:
        for owner, originals in saved:
            for name, original in originals.items():
                setattr(owner, name, original)
