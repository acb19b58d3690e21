"""A patch_timm'ed timm Swin trains under DistributedDataParallel and FSDP2
(``fully_shard``): two CPU processes (gloo over loopback) take the same optimizer
steps as one process over the same global batch, and as the unpatched timm model. On
CPU the patched modules run the reference backend."""
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

try:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.6
    fully_shard = DTensor = None

timm = pytest.importorskip("timm", reason="the model under training is a timm Swin")

import pyvit_ops  # noqa: E402
from pyvit_ops import nn as pnn  # noqa: E402

WORLD_SIZE = 2
STEPS = 3
BATCH = 4  # global: BATCH // WORLD_SIZE per process
IMAGE = (3, 32, 32)
CLASSES = 5


def _model(patched):
    from timm.models.swin_transformer import SwinTransformer
    torch.manual_seed(0)
    # 8x8 then 4x4 token grids under 4x4 windows: padding-free, shifted blocks in stage 1.
    model = SwinTransformer(img_size=IMAGE[1:], window_size=4, embed_dim=24, depths=(2, 2),
                            num_heads=(1, 2), num_classes=CLASSES, drop_path_rate=0.0)
    if patched:
        pyvit_ops.patch_timm(model)
        assert any(isinstance(m, pnn.WindowAttention) for m in model.modules())
    return model


def _data():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(STEPS, BATCH, *IMAGE, generator=generator)
    labels = torch.randint(0, CLASSES, (STEPS, BATCH), generator=generator)
    return images, labels


def _train(model, forward, images, labels):
    """SGD steps of ``forward`` (the model, or its wrapper) on the cross-entropy:
    every step's gradients and the total update (final - initial) of each parameter
    of ``model``."""
    initial = {n: _whole(p.detach()).clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    grads = []
    for x, y in zip(images, labels):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(forward(x), y).backward()
        grads.append({n: _whole(p.grad).clone() for n, p in model.named_parameters()})
        optimizer.step()
    return grads, {n: _whole(p.detach()) - initial[n] for n, p in model.named_parameters()}


def _whole(t):
    """``t`` unsharded: FSDP's DTensor shards are gathered from every process."""
    return t.full_tensor() if DTensor is not None and isinstance(t, DTensor) else t


def _fsdp(model):
    from torch.distributed.device_mesh import init_device_mesh
    from timm.models.swin_transformer import SwinTransformerBlock
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    for block in [m for m in model.modules() if isinstance(m, SwinTransformerBlock)]:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


WRAPPERS = {"ddp": DistributedDataParallel, "fsdp": _fsdp}
if fully_shard is None:
    del WRAPPERS["fsdp"]


def _worker(rank, port, directory):
    torch.set_num_threads(1)  # two processes share the machine's cores
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
    try:
        images, labels = _data()
        local = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
        for name, wrap in WRAPPERS.items():
            model = _model(patched=True)
            result = _train(model, wrap(model), images[:, local], labels[:, local])
            if rank == 0:
                torch.save(result, os.path.join(directory, f"{name}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_close(actual, expected, tol, msg):
    # Relative to each tensor's largest entry: the relative position tables' gradients
    # are ~1e-5, below any absolute tolerance that fits the others.
    torch.testing.assert_close(actual, expected, atol=tol * expected.abs().max().item(),
                               rtol=tol, msg=msg)


def _assert_same_training(actual, expected, tol, what):
    (grads, params), (grads_ref, params_ref) = actual, expected  # params: the updates
    for step, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        assert g.keys() == g_ref.keys()
        for key in g_ref:
            _assert_close(g[key], g_ref[key], tol,
                          lambda m, k=key, s=step: f"{what}: grad of {k}, step {s}: {m}")
    for key in params_ref:
        _assert_close(params[key], params_ref[key], tol,
                      lambda m, k=key: f"{what}: update of {k}: {m}")


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    """Each wrapper's training on two processes (one spawn for all: starting a
    process, which imports torch and timm, is the cost here)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    directory = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(_free_port(), str(directory)), nprocs=WORLD_SIZE, join=True)
    return {name: torch.load(directory / f"{name}.pt") for name in WRAPPERS}


@pytest.fixture(scope="module")
def single_process():
    """(patched, unpatched) training on one process over the global batch."""
    images, labels = _data()
    threads = torch.get_num_threads()
    # As in the workers: on tensors this small, intra-op threads only add (on a busy
    # machine, many seconds of) synchronisation.
    torch.set_num_threads(1)
    try:
        return tuple(_train(m, m, images, labels) for m in (_model(True), _model(False)))
    finally:
        torch.set_num_threads(threads)


def test_training_moves_every_parameter(single_process):
    # So a gradient the patch lost would show in the comparisons with timm.
    for _, updates in single_process:
        assert all(update.any() for update in updates.values())


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_patched_swin_trains_distributed(wrapper, distributed_runs, single_process):
    if wrapper not in WRAPPERS:
        pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6")
    patched, unpatched = single_process
    # The same computation as one process, up to the order of the batch sums.
    _assert_same_training(distributed_runs[wrapper], patched, 1e-4, f"{wrapper} vs one process")
    # And timm's training up to summation order, compounded over the steps.
    _assert_same_training(distributed_runs[wrapper], unpatched, 1e-3,
                          f"{wrapper} vs unpatched timm")
