"""The "Muon strategy": distributed Muon as a one-word choice in the YAML (`strategy: muon_ddp | muon_fsdp`).

- `muon_ddp`: data parallel with the paper's ZeRO-1 Distributed Muon (Algorithm 1). The model is NOT wrapped in
  DistributedDataParallel: the optimizer reduce-scatters the gradients itself, keeps its state for the local shard,
  and all-gathers the updated parameters. Checkpoints hold the consolidated (single-device format) optimizer state,
  so a run can resume on a different number of ranks.
- `muon_fsdp`: FSDP2 (`fully_shard`, parameters `Shard(0)`) through Lightning's `ModelParallelStrategy` with
  data_parallel_size = world size and tensor_parallel_size = 1; Muon runs its DTensor path. Sharded (DCP)
  checkpoints. `parallelize()` is the one place that applies `fully_shard`.

The math stays in `components/optim`; these classes only wire it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.strategies.ddp import _sync_module_states
from torch import nn

from app.checkpoint_io import save_sharded


class MuonDDPStrategy(DDPStrategy):
    strategy_name = "muon_ddp"
    muon_variant = "zero1"

    def configure_ddp(self) -> None:
        # No DDP wrapper: gradients are reduce-scattered by the ZeRO-1 optimizer (Algorithm 1, line 2).
        assert self.model is not None
        _sync_module_states(self.model)

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        return optimizer.full_state_dict()  # collective: every rank calls it, rank 0 writes the file

    def load_optimizer_state_dict(self, checkpoint) -> None:
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            optimizer.load_full_state_dict(state)

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="DDP with ZeRO-1 Distributed Muon",
                                   override=True)


class MuonFSDPStrategy(ModelParallelStrategy):
    strategy_name = "muon_fsdp"
    muon_variant = "dtensor"

    def __init__(self, data_parallel_size="auto", save_distributed_checkpoint: bool = True,
                 param_dtype: str | None = None, reduce_dtype: str | None = None, **kwargs) -> None:
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self._param_dtype = param_dtype
        self._reduce_dtype = reduce_dtype

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * len(self.parallel_devices or [1])
        super().setup_environment()

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Apply FSDP2 to each decoder layer, then to the root (embeddings, final norm, LM head)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = self.device_mesh["data_parallel"]
        mp = MixedPrecisionPolicy(param_dtype=_dtype(self._param_dtype), reduce_dtype=_dtype(self._reduce_dtype))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        return model

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        """A sharded checkpoint is a folder: written under a temporary name beside its place, then renamed (see
        app/checkpoint_io.py); whole-file checkpoints go through the CheckpointIO."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        save_sharded(lambda tmp: super(MuonFSDPStrategy, self).save_checkpoint(checkpoint, tmp, storage_options),
                     Path(self.broadcast(str(filepath))), is_writer=self.global_rank == 0, barrier=self.barrier)

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="FSDP2 with DTensor Muon", override=True)


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def register() -> None:
    """Make `strategy: muon_ddp` / `strategy: muon_fsdp` resolvable by name in Trainer(strategy=...)."""
    for cls in (MuonDDPStrategy, MuonFSDPStrategy):
        if cls.strategy_name not in StrategyRegistry:
            cls.register_strategies(StrategyRegistry)


register()
