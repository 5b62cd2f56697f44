"""Nested adapters under DDP (one and two nodes), FSDP2 and DeepSpeed ZeRO-2/3, two CPU processes each (gloo).

Each strategy is launched once (module-scoped fixtures) through ``torchrun`` on ``tests/dist_worker.py``; the
worker writes its results to files that these tests compare with each other and with a single-process run in this
process. References: the DDP run for the sharded strategies; a single process on the same global batches for DDP.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dist_worker as W
from lightning_matlora import MatryoshkaLoRA
from lightning_matlora.distributed import SUPPORTED_STRATEGIES, check_strategy, full_adapter_state_dict
from lightning_matlora.rank import RankController

WORKER = Path(__file__).with_name("dist_worker.py")
ROOT = WORKER.parent.parent
pytestmark = pytest.mark.slow
TIMEOUT_S = 300  # one launch: ~20-40 s normally, up to a few minutes for DeepSpeed's first op compilation


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=str(cache / "torch_extensions"), PYTHONPATH=str(ROOT))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _launch(scenario: str, out: Path, cache: Path) -> list[subprocess.CompletedProcess]:
    port = free_port()
    base = [sys.executable, "-m", "torch.distributed.run", "--master-addr=127.0.0.1", f"--master-port={port}"]
    if scenario == "nodes":  # two simulated nodes on localhost: one torchrun per node, one process each
        cmds = [base + ["--nnodes=2", "--nproc-per-node=1", f"--node-rank={i}", str(WORKER), scenario, str(out)]
                for i in range(2)]
    else:
        cmds = [base + ["--nnodes=1", "--nproc-per-node=2", str(WORKER), scenario, str(out)]]
    procs = [subprocess.Popen(c, cwd=ROOT, env=_env(cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) for c in cmds]
    done = []
    for c, p in zip(cmds, procs):
        try:
            stdout, _ = p.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:  # a hang: end this launch's process groups (torchrun and its workers)
            for q in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(q.pid, signal.SIGKILL)
            stdout, _ = p.communicate()
            stdout += f"\n[killed after {TIMEOUT_S} s]"
        done.append(subprocess.CompletedProcess(c, p.returncode, stdout, ""))
    return done


def run_scenario(scenario: str, out: Path, cache: Path) -> dict:
    """Run ``scenario`` on two processes; retry once if no complete result was written.

    A nonzero exit is accepted only when rank 0 wrote its complete result after the final barrier (the rare gloo
    abort at interpreter exit); anything else fails with the processes' output.
    """
    for attempt in range(2):
        run_dir = out / f"attempt{attempt}"
        procs = _launch(scenario, run_dir, cache)
        result_file = run_dir / "result.pt"
        ranks = [run_dir / f"rank{r}.pt" for r in range(2)]
        if result_file.exists() and all(r.exists() for r in ranks):
            result = torch.load(result_file, weights_only=False)
            if result.get("complete"):
                result["ranks"] = [torch.load(r, weights_only=False) for r in ranks]
                return result
        log = "\n".join(p.stdout[-6000:] for p in procs)
    pytest.fail(f"{scenario}: no complete result after 2 attempts (exit codes {[p.returncode for p in procs]}):\n{log}")


@pytest.fixture(scope="session")
def dist_cache(request) -> Path:
    path = Path(str(request.config.cache.mkdir("matlora_distributed")))  # compiled DeepSpeed ops persist here
    return path


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, dist_cache):
    return run_scenario("ddp", tmp_path_factory.mktemp("ddp"), dist_cache)


def _assert_same(a: dict, b: dict, atol: float, rtol: float = 0.0) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=k)


def _global_losses(result: dict) -> torch.Tensor:
    """Per-step mean of the processes' local losses (equal per-process batch sizes: the global batch's loss)."""
    return torch.tensor([r["losses"] for r in result["ranks"]]).mean(0)


def _adapter_numel(result: dict) -> int:
    return sum(v.numel() for v in result["full"].values())


# ------------------------------------------------------------------------------------------------------- DDP
def test_ddp_adapters_identical_on_every_process(ddp):
    r0, r1 = ddp["ranks"]
    assert r0["local"] and set(r0["local"]) == set(r1["local"])
    for k in r0["local"]:
        assert torch.equal(r0["local"][k], r1["local"][k]), k
    assert any(v.abs().max() > 0 for k, v in ddp["full"].items() if k.endswith("lora_B")), "the adapter trained"
    assert r0["optimizer_numel"] == _adapter_numel(ddp), "the frozen base entered the optimizer"


def test_ddp_equals_single_process_on_the_same_global_batches(ddp, tmp_path):
    import lightning.pytorch as pl

    pl.seed_everything(0)
    module = W.TinyLM(batch_size=2 * W.PER_DEVICE_BATCH, val=True)
    cb = MatryoshkaLoRA(r_max=W.R_MAX, verbose=False, save_adapter=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=W.MAX_STEPS, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0,
                         use_distributed_sampler=False, callbacks=[cb])
    trainer.fit(module)
    single = full_adapter_state_dict(trainer)
    seen = [sorted(a + b) for a, b in zip(*(r["rows"] for r in ddp["ranks"]))]
    assert seen == [sorted(rows) for rows in module.rows], "the same global batches"
    _assert_same(ddp["full"], single, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(_global_losses(ddp), torch.tensor(module.losses), atol=1e-5, rtol=0)


def test_ddp_rank_curve_is_reduced_over_every_process(ddp, tmp_path):
    """The callback's rank curve under DDP equals one process's curve on all the validation data (same adapter)."""
    import lightning.pytorch as pl

    from lightning_matlora import load_adapter

    assert sorted(ddp["curve"]) == [1, 2, 4, 8]
    # one process, the DDP run's saved adapter, all validation sequences
    module = W.TinyLM(batch_size=5, val=True)  # other batch boundaries than DDP's: the curve weighs rows
    module.configure_model()
    cb = MatryoshkaLoRA(r_max=W.R_MAX, verbose=False, save_adapter=False)
    cb.apply(module)
    load_adapter(module.model, ddp["saved_dir"])
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path), use_distributed_sampler=False,
                         callbacks=[cb])
    trainer.validate(module)
    single = cb.last_curves[0].as_mapping()
    for k in single:  # one process's mean over all rows, not rank 0's half
        assert abs(ddp["curve"][k] - single[k]) < 1e-5, (k, ddp["curve"][k], single[k])
    assert len({round(v, 4) for v in single.values()}) > 1, "the ranks differ"


def test_dylora_draws_the_same_rank_on_every_process_each_step(ddp):
    r0, r1 = ddp["ranks"]
    assert r0["dylora_ranks"] == r1["dylora_ranks"]
    ctrl = RankController(MatryoshkaLoRA(r_max=W.R_MAX, mode="dylora", ranks=[1, 2, 4, 8]).config)
    expected = []
    for step in range(W.MAX_STEPS):  # derived from (seed, global_step) alone
        ctrl.begin_step(step)
        expected.append(ctrl.step_rank)
    assert r0["dylora_ranks"] == expected


def test_ddp_paired_passes_equal_single_process_and_differ_from_the_default(ddp, tmp_path):
    """The paired passes (max_pass=True) under DDP: Lightning's DDP wrapper calls the callback's wrapped
    training_step, which runs the user's step in the max pass then the low pass before one backward (the user's step
    runs twice per step), and the adapter equals the single-process run on the same global batches. The default
    (one pass; test_ddp_equals_single_process_on_the_same_global_batches) runs the step once and trains another
    adapter."""
    import lightning.pytorch as pl

    pl.seed_everything(0)
    module = W.TinyLM(batch_size=2 * W.PER_DEVICE_BATCH, val=True)
    cb = MatryoshkaLoRA(r_max=W.R_MAX, verbose=False, save_adapter=False, max_pass=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=W.MAX_STEPS, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0,
                         use_distributed_sampler=False, callbacks=[cb])
    trainer.fit(module)
    assert all(len(r["losses"]) == W.MAX_STEPS for r in ddp["ranks"])  # the default: once per step
    runs = [r["paired"] for r in ddp["ranks"]]
    assert all(len(r["losses"]) == 2 * W.MAX_STEPS for r in runs)  # max_pass=True: twice per step
    seen = [sorted(a + b) for a, b in zip(*(r["rows"] for r in runs))]
    assert seen == [sorted(rows) for rows in module.rows], "the same global batches"
    _assert_same(ddp["paired_full"], full_adapter_state_dict(trainer), atol=2e-6, rtol=1e-5)
    ddp_losses = torch.tensor([r["losses"] for r in runs]).mean(0)
    torch.testing.assert_close(ddp_losses, torch.tensor(module.losses), atol=1e-5, rtol=0)
    assert any(not torch.allclose(ddp["paired_full"][k], ddp["full"][k]) for k in ddp["full"]), "another objective"


def test_ddp_checkpoint_holds_only_the_adapter_and_resume_continues_exactly(ddp):
    keys = ddp["checkpoint"]["keys"]
    assert keys and set(keys) == set(ddp["full"]), "the checkpoint's state_dict is the adapter, not the base"
    assert ddp["resumed_global_step"] == W.MAX_STEPS
    _assert_same(ddp["resumed"], ddp["full"], atol=0)


def test_ddp_resume_with_another_r_max_fails_clearly_on_every_process(ddp):
    for r in ddp["ranks"]:
        msg = r["mismatch_error"]
        assert msg is not None and "r_max=8" in msg and "r_max=16" in msg and "MatryoshkaLoRA(r_max=8" in msg


def test_two_nodes_equal_one_node(ddp, tmp_path, dist_cache):
    nodes = run_scenario("nodes", tmp_path, dist_cache)
    assert nodes["world_size"] == 2
    _assert_same(nodes["full"], ddp["full"], atol=1e-6)
    for k in nodes["ranks"][0]["local"]:
        assert torch.equal(nodes["ranks"][0]["local"][k], nodes["ranks"][1]["local"][k])


# ------------------------------------------------------------------------------- FSDP2 and DeepSpeed ZeRO
@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory, dist_cache):
    return run_scenario("fsdp2", tmp_path_factory.mktemp("fsdp2"), dist_cache)


@pytest.fixture(scope="module")
def zero2(tmp_path_factory, dist_cache):
    return run_scenario("zero2", tmp_path_factory.mktemp("zero2"), dist_cache)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory, dist_cache):
    return run_scenario("zero3", tmp_path_factory.mktemp("zero3"), dist_cache)


@pytest.fixture(params=["fsdp2", "zero2", "zero3"])
def sharded(request):
    return request.getfixturevalue(request.param)


def test_sharded_fit_matches_ddp(sharded, ddp):
    torch.testing.assert_close(_global_losses(sharded), _global_losses(ddp), atol=1e-5, rtol=0)
    # the saved adapter is complete: every tensor at its full shape, equal to the DDP run's
    _assert_same(sharded["full"], ddp["full"], atol=1e-5, rtol=1e-4)
    r0, r1 = sharded["ranks"]
    _assert_same(r0["full"], r1["full"], atol=0)  # every process gathers the same full adapter


def test_sharded_optimizer_holds_only_adapter_shards(sharded):
    numel = _adapter_numel(sharded)
    per_rank = [r["optimizer_numel"] for r in sharded["ranks"]]
    # the frozen base never enters the optimizer; each process updates about half of the adapter
    assert sum(per_rank) <= numel + 64 and min(per_rank) > 0 and max(per_rank) < numel, per_rank


def test_sharded_checkpoint_excludes_the_base_and_resume_continues_exactly(sharded):
    keys = [k.removeprefix("state_dict.") for k in sharded["checkpoint"]["keys"]]
    assert set(keys) == set(sharded["full"]), "the checkpoint holds the adapter only (no frozen base)"
    assert sharded["resumed_global_step"] == W.MAX_STEPS
    _assert_same(sharded["resumed"], sharded["full"], atol=1e-6)


def test_fsdp2_really_shards_and_refuses_adapters_after_fully_shard(fsdp2):
    r0 = fsdp2["ranks"][0]
    full = fsdp2["full"]
    assert all(r0["local"][k].shape[0] * 2 == full[k].shape[0] for k in full), "local shards are halves"
    msg = r0["sharded_first_error"]
    assert msg is not None and "prepare_for_sharding(self)" in msg and "fully_shard" in msg


def test_zero3_partitions_adapters_and_refuses_a_materialised_model(zero3):
    r0 = zero3["ranks"][0]
    assert all(v.numel() == 0 for v in r0["local"].values()), "ZeRO-3 partitions the adapters too"
    msg = r0["materialised_error"]
    assert msg is not None and "configure_model" in msg and "ZeRO-3" in msg


@pytest.mark.parametrize("run", ["ddp", "fsdp2", "zero2", "zero3"])
def test_the_adapter_saved_by_the_callback_is_complete(run, request):
    """What MatryoshkaLoRA wrote at the end of fit (save_adapter) is the full adapter, under every strategy."""
    result, ddp = request.getfixturevalue(run), request.getfixturevalue("ddp")
    saved = result["saved"]
    expected = {k.removeprefix("model."): v for k, v in ddp["full"].items()}  # keys relative to the Llama
    assert set(saved) == set(expected)
    for k, v in expected.items():
        assert saved[k].shape == v.shape, k
        torch.testing.assert_close(saved[k], v, atol=1e-5, rtol=1e-4, msg=k)


# -------------------------------------------------------------------------------------------- bad input
def test_unsupported_strategy_is_refused_at_setup_naming_the_supported_ones(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import SingleDeviceXLAStrategy, Strategy

    class HomeMadeStrategy(Strategy):
        """A working single-process strategy of no kind the plugin knows (its sharding could be anything)."""

        root_device = torch.device("cpu")
        is_global_zero = True

        def model_to_device(self) -> None:
            self.model.to(self.root_device)

        def reduce(self, tensor, *args, **kwargs):
            return tensor

        def barrier(self, *args, **kwargs) -> None:
            pass

        def broadcast(self, obj, src=0):
            return obj

        def all_gather(self, tensor, group=None, sync_grads=False):
            return tensor

    trainer = pl.Trainer(accelerator="cpu", strategy=HomeMadeStrategy(), max_steps=1, logger=False,
                         enable_progress_bar=False, default_root_dir=str(tmp_path),
                         callbacks=[MatryoshkaLoRA(r_max=4, verbose=False)])
    with pytest.raises(ValueError, match="does not support the HomeMadeStrategy strategy. Supported: single device"):
        trainer.fit(W.TinyLM())
    with pytest.raises(ValueError, match="does not support the SingleDeviceXLAStrategy"):
        check_strategy(object.__new__(SingleDeviceXLAStrategy))  # XLA: per-step rank changes would recompile
    assert "DeepSpeed ZeRO stages 1, 2 and 3" in SUPPORTED_STRATEGIES and "FSDP2" in SUPPORTED_STRATEGIES
