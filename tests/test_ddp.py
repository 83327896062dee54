"""The adapters under `accelerate` DDP, two CPU processes (gloo): NFNOptimizer (with gradient accumulation), the
predictor's fit (with and without the collapse head) and the editor's training keep bit-identical replicas."""

from __future__ import annotations

import os
import socket
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

from model_factories import build
from test_optim import _learned, _loss

WORLD = 2
STEPS = 6  # micro-batches; 3 optimizer steps with accumulation 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, port: int) -> None:
    """This spawned process becomes rank ``rank`` of the 2-process group (what `accelerate launch` sets up)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)


def _save_flat(module: torch.nn.Module, out_dir: str, rank: int) -> None:
    torch.save(torch.cat([p.detach().flatten() for p in module.parameters()]), os.path.join(out_dir, f"rank{rank}.pt"))


def _replicas(tmp_path, worker, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``worker(rank, port, out_dir, *args)`` on 2 processes; the parameters each rank saved."""
    mp.spawn(worker, args=(_free_port(), str(tmp_path), *args), nprocs=WORLD, join=True)
    return tuple(torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))


def _worker(rank: int, port: int, out_dir: str) -> None:
    _join(rank, port)
    from accelerate import Accelerator

    from nfn_plugins.optim import NFNOptimizer

    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    assert acc.num_processes == WORLD, acc.state
    torch.manual_seed(0)  # the same initial weights on both ranks
    model, make_inputs = build("bert")
    model = model.float()
    opt = NFNOptimizer(model, lr=1e-2, learned=_learned(dtype=torch.float32))
    model, opt = acc.prepare(model, opt)
    for step in range(STEPS):
        with acc.accumulate(model):
            acc.backward(_loss(model, make_inputs(100 * rank + step)))  # each rank its own data
            opt.step()
            opt.zero_grad()
    _save_flat(acc.unwrap_model(model), out_dir, rank)
    acc.end_training()


def test_two_process_ddp_replicas_stay_bit_identical(tmp_path):
    torch.manual_seed(0)
    initial = torch.cat([p.detach().flatten() for p in build("bert")[0].float().parameters()])
    r0, r1 = _replicas(tmp_path, _worker)
    assert not torch.equal(r0, initial)  # it trained
    assert torch.equal(r0, r1)  # and both replicas hold the same bits


def _predictor(n_classes: int):
    from test_predictor import SMALL, AccuracyPredictor

    torch.manual_seed(0)
    return AccuracyPredictor(replace(SMALL, n_classes=n_classes))


def _predictor_worker(rank: int, port: int, out_dir: str, n_classes: int) -> None:
    _join(rank, port)
    from nfn_plugins.predictor import FitConfig
    from nfn_plugins.predictor_cli import _accelerator
    from test_collapse import _with_collapsed

    acc = _accelerator()
    assert acc is not None and acc.num_processes == WORLD
    model = _predictor(n_classes)
    ws, y, collapsed = _with_collapsed(32, 0)
    model.fit((ws, y), None, FitConfig(epochs=2, batch_size=8), accelerator=acc, progress=False,
              collapsed=[collapsed] if n_classes else None)
    _save_flat(model, out_dir, rank)
    acc.end_training()


@pytest.mark.parametrize("n_classes", [0, 2])  # 2: with the collapse head, whose gate loss goes through forward
def test_predictor_fit_under_two_process_ddp(tmp_path, n_classes):
    """Each process trains on its share of the mini-batches; gradients are averaged, replicas stay identical."""
    r0, r1 = _replicas(tmp_path, _predictor_worker, n_classes)
    initial = torch.cat([p.detach().flatten() for p in _predictor(n_classes).parameters()])
    assert not torch.equal(r0, initial)  # it trained
    assert torch.equal(r0, r1)


def _editor_worker(rank: int, port: int, out_dir: str) -> None:
    _join(rank, port)
    from accelerate import Accelerator, DistributedDataParallelKwargs

    from nfn_plugins.editor import WeightEditor, edited_parameters

    # static graph: the editor's output is a WeightSpace, whose tensors DDP's unused-parameter search cannot see
    acc = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(static_graph=True)])
    assert acc.num_processes == WORLD
    torch.manual_seed(0)  # the same model and editor on both ranks
    model, make_inputs = build("bert")
    model = model.float().requires_grad_(False)
    editor = WeightEditor(max_rel=0.2)
    editor, opt = acc.prepare(editor, torch.optim.Adam(editor.parameters(), lr=0.05))
    for step in range(3):
        params = edited_parameters(editor, model)  # through the DDP wrapper: gradients are averaged
        out = torch.func.functional_call(model, params, args=(), kwargs=make_inputs(100 * rank + step))
        loss = out.logits.square().mean()  # each rank its own data
        opt.zero_grad()
        acc.backward(loss)
        opt.step()
    _save_flat(acc.unwrap_model(editor), out_dir, rank)
    acc.end_training()


def test_editor_training_under_two_process_ddp(tmp_path):
    """An editor trained through functional_call under accelerate: each rank its own data, replicas identical."""
    from nfn_plugins.editor import WeightEditor

    torch.manual_seed(0)
    build("bert")
    initial = torch.cat([p.detach().flatten() for p in WeightEditor(max_rel=0.2).parameters()])
    r0, r1 = _replicas(tmp_path, _editor_worker)
    assert not torch.equal(r0, initial)  # it trained
    assert torch.equal(r0, r1)  # with averaged gradients: both replicas hold the same bits
