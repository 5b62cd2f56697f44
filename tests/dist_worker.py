"""One process of a multi-process test run (launched by tests/test_distributed.py through torchrun).

    python -m torch.distributed.run --nproc-per-node=2 tests/dist_worker.py SCENARIO OUT_DIR

Scenarios: ``ddp`` (also dylora draws, the one-pass rule ``max_pass=False`` and a mismatched-r_max resume), ``nodes`` (DDP over two simulated nodes),
``fsdp2`` (fully_shard through ModelParallelStrategy), ``zero2`` and ``zero3`` (DeepSpeed on CPU). Each writes
``rank{r}.pt`` per process and, on rank 0 after a final barrier, ``result.pt`` with ``complete=True``: the test
accepts a run only when that file is complete.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # conftest's tiny models
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the package

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset  # noqa: E402

from conftest import tiny_llama  # noqa: E402
from lightning_matlora import MatryoshkaLoRA, prepare_for_sharding  # noqa: E402
from lightning_matlora.distributed import full_adapter_state_dict  # noqa: E402

R_MAX = 8
N_SEQ, SEQ_LEN = 16, 12  # one epoch of 4 steps on 2 processes (global batch 4)
PER_DEVICE_BATCH = 2
N_VAL = 12  # validation sequences: 3 batches of 2 per process
MAX_STEPS = 4
LR = 0.5


def dataset(seed: int = 1234, n: int = N_SEQ) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randint(0, 97, (n, SEQ_LEN), generator=g))


class TinyLM(pl.LightningModule):
    """A tiny Llama built in configure_model (the same base and RNG stream under every strategy)."""

    def __init__(self, shard: bool = False, batch_size: int = PER_DEVICE_BATCH, prepare: bool = True,
                 val: bool = False) -> None:
        super().__init__()
        self.shard, self.batch_size, self.prepare, self.val = shard, batch_size, prepare, val
        # the base weights, loaded in configure_model: a model built under deepspeed.zero.Init skips transformers'
        # weight init (its parameters are already partitioned), so every strategy loads the same weights instead
        self.base_weights = tiny_llama(seed=0).state_dict()
        self.model: torch.nn.Module | None = None
        self.losses: list[float] = []
        self.rows: list[list[int]] = []
        self.step_ranks: list[int | None] = []

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = tiny_llama(seed=0)
        params = [p for p in self.model.parameters() if hasattr(p, "ds_id")]
        if params:  # ZeRO-3: gather, load on rank 0, re-partition
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                self.model.load_state_dict(self.base_weights)
        else:
            self.model.load_state_dict(self.base_weights)
        self.model.train()
        torch.manual_seed(1)  # the adapters' initialisation, right after this hook
        if self.shard:  # FSDP2: adapters first, then fully_shard
            from torch.distributed.fsdp import fully_shard

            if self.prepare:
                prepare_for_sharding(self)
            mesh = self.device_mesh["data_parallel"]
            for block in self.model.model.layers:
                fully_shard(block, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.losses.append(float(loss.detach()))
        self.rows.append(ids[:, 0].tolist())  # which sequences this step saw (their first tokens)
        ctrl = next(iter(m.controller for m in self.modules() if hasattr(m, "controller")), None)
        self.step_ranks.append(ctrl.step_rank if ctrl is not None else None)
        return loss

    def validation_step(self, batch, batch_idx):
        """One loss per row (the rank curve's one-pass evaluation)."""
        (ids,) = batch
        logits = self.model(input_ids=ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        return nll.mean(1)

    def val_dataloader(self):
        if not self.val:
            return []
        data = dataset(seed=99, n=N_VAL)
        sampler = DistributedSampler(data, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank,
                                     shuffle=False)
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)

    def train_dataloader(self):
        # explicit: rank r takes sequences r, r + world, ...; a step's global batch is the next world × batch sequences
        data = dataset()
        sampler = DistributedSampler(data, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank,
                                     shuffle=False)
        return ResumableLoader(data, batch_size=self.batch_size, sampler=sampler)


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning can resume mid-epoch (it skips the batches the checkpoint had consumed)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0
        self._skip = 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self._yielded = skip
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                self._yielded += 1
                yield batch

    def state_dict(self) -> dict:
        return {"yielded": self._yielded}

    def load_state_dict(self, state: dict) -> None:
        self._skip = int(state["yielded"])


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Test-only: DeepSpeed's ZeRO on CPU processes with gloo (the stock strategy insists on CUDA)."""

    def setup_environment(self) -> None:  # the stock one refuses any accelerator but CUDA
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:  # the stock one checks CUDA device indices
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:  # an index, for deepspeed.initialize(args.device_rank); CPU ignores it
        return torch.device("cpu", self.local_rank)


def make_strategy(scenario: str):
    if scenario in ("ddp", "nodes"):
        return DDPStrategy(process_group_backend="gloo")
    if scenario == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    stage = {"zero2": 2, "zero3": 3}[scenario]
    return CPUDeepSpeedStrategy(stage=stage, process_group_backend="gloo")


def trainer(scenario: str, callbacks, out: Path, **kw) -> pl.Trainer:
    nodes = scenario == "nodes"
    return pl.Trainer(accelerator="cpu", devices=1 if nodes else 2, num_nodes=2 if nodes else 1,
                      strategy=make_strategy(scenario), max_steps=MAX_STEPS, callbacks=callbacks,
                      logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(out), use_distributed_sampler=False, num_sanity_val_steps=0, **kw)


def fit(scenario: str, out: Path, ckpt_dir: Path | None = None, ckpt_path: str | None = None, **cb_kw):
    pl.seed_everything(0, workers=True)
    cb = MatryoshkaLoRA(r_max=R_MAX, verbose=False, **cb_kw)
    callbacks = [cb]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=2, save_top_k=-1,
                                         filename="{step}"))
    module = TinyLM(shard=scenario == "fsdp2", val=scenario == "ddp")
    t = trainer(scenario, callbacks, out)
    t.fit(module, ckpt_path=ckpt_path)
    return t, module, cb


def local_adapter(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This process's own view of the adapter factors (local shards under FSDP2/ZeRO-3)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for n, p in module.named_parameters():
        if n.endswith("lora_A") or n.endswith("lora_B"):
            out[n] = (p.to_local() if isinstance(p, DTensor) else p).detach().cpu().clone()
    return out


def optimizer_numel(t: pl.Trainer) -> int:
    """Elements this process's torch optimizer updates (DeepSpeed: its fp32 partitions; FSDP2: local shards)."""
    opt = t.optimizers[0]
    opt = getattr(opt, "_optimizer", opt)  # LightningOptimizer
    for field in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):  # ZeRO-3, ZeRO-1/2
        if hasattr(opt, field):
            return sum(p.numel() for p in getattr(opt, field))
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for g in opt.param_groups for p in g["params"])


def checkpoint_report(path: Path) -> dict:
    """What the checkpoint at ``path`` (a file, or DeepSpeed/DCP directory) stores about the model."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    report = {"bytes": sum(p.stat().st_size for p in files), "files": [str(p.relative_to(path.parent)) for p in files]}
    keys: set[str] = set()
    for p in files:
        if p.suffix in (".pt", ".ckpt"):
            obj = torch.load(p, map_location="cpu", weights_only=False)
            for field in ("state_dict", "module"):
                if isinstance(obj, dict) and isinstance(obj.get(field), dict):
                    keys.update(obj[field])
            if isinstance(obj, dict) and "frozen_param_shapes" in obj and obj["frozen_param_shapes"]:
                keys.update(f"frozen:{k}" for k in obj["frozen_param_shapes"])
    if path.is_dir():  # distributed checkpoint (FSDP2): the keys are in the metadata
        meta = path / ".metadata"
        if meta.exists():
            from torch.distributed.checkpoint import FileSystemReader

            keys.update(k for k in FileSystemReader(str(path)).read_metadata().state_dict_metadata
                        if k.startswith("state_dict."))
    report["keys"] = sorted(keys)
    return report


class EagerLM(TinyLM):
    """Builds its model in __init__ (fine under DDP, wrong under ZeRO-3)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama(seed=0)


def expect_error(scenario: str, out: Path, module: pl.LightningModule) -> str | None:
    """Fit ``module`` and return the message of the error it raises (None if it trains)."""
    try:
        trainer(scenario, [MatryoshkaLoRA(r_max=R_MAX, verbose=False)], out).fit(module)
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"scenario": scenario}

    t, module, cb = fit(scenario, out / "a", ckpt_dir=out / "ckpt")
    rank = t.global_rank
    full = full_adapter_state_dict(t)
    mine = {"local": local_adapter(module), "full": full, "losses": module.losses, "rows": module.rows}
    result.update(full=full, losses=module.losses, world_size=t.world_size, strategy=type(t.strategy).__name__)
    mine["optimizer_numel"] = optimizer_numel(t)
    if cb.last_curves:
        result["curve"] = cb.last_curves[0].as_mapping()  # the loss, reduced over both processes' validation data
    if cb.adapter_path and rank == 0:  # the adapter the callback saved at the end of fit
        from lightning_matlora import read_adapter

        result["saved"] = read_adapter(cb.adapter_path).tensors
        result["saved_dir"] = cb.adapter_path

    if scenario != "nodes":
        ckpt = out / "ckpt" / "step=2.ckpt"
        t.strategy.barrier()
        result["checkpoint"] = checkpoint_report(ckpt) if rank == 0 else None
        t2, _, _ = fit(scenario, out / "b", ckpt_path=str(ckpt))
        result["resumed"] = full_adapter_state_dict(t2)
        result["resumed_global_step"] = t2.global_step

    if scenario == "ddp":
        t3, m3, _ = fit(scenario, out / "c", mode="dylora", ranks=[1, 2, 4, 8])
        mine["dylora_ranks"] = m3.step_ranks
        # the paired passes (max_pass=True): the callback's wrapped training_step runs inside DDP's forward (two
        # passes, one backward); the default (the runs above) trains one pass, to compare
        t4, m4, _ = fit(scenario, out / "f", max_pass=True)
        mine["paired"] = {"losses": m4.losses, "rows": m4.rows}
        result["paired_full"] = full_adapter_state_dict(t4)
        try:  # resume with a different r_max: a clear error on every process
            pl.seed_everything(0)
            bad = MatryoshkaLoRA(r_max=R_MAX * 2, verbose=False)
            trainer(scenario, [bad], out / "d").fit(TinyLM(), ckpt_path=str(out / "ckpt" / "step=2.ckpt"))
            mine["mismatch_error"] = None
        except ValueError as e:
            mine["mismatch_error"] = str(e)

    if scenario == "fsdp2":  # fully_shard before the adapters existed: a clear error
        mine["sharded_first_error"] = expect_error(scenario, out / "e", TinyLM(shard=True, prepare=False))
    if scenario == "zero3":  # a model materialised in __init__, before ZeRO-3 could partition it
        mine["materialised_error"] = expect_error(scenario, out / "e", EagerLM())

    torch.save(mine, out / f"rank{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank == 0:
        result["complete"] = True
        torch.save(result, out / "result.pt.tmp")
        os.replace(out / "result.pt.tmp", out / "result.pt")


if __name__ == "__main__":
    main()
