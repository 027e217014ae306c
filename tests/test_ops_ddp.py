"""The tracker under a real process group (gloo, 2 CPU processes): every step's means and labels are
all-gathered (selectivity.reduce.all_gather_batch), so each rank's per-step SI equals one process's on
the same images, with an uneven split, a null and the incremental cache."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from selectivity.reduce import all_gather_batch
from selectivity.tracker import SelectivityTracker

SPLIT = (7, 4)  # images per step on rank 0 and rank 1
K, STEPS, NULLS = 5, 6, 2


def model():
    # float64: a float32 matmul's per-image result may depend on the batch it is computed in (the
    # BLAS picks its kernel by shape and CPU: here the Linear's outputs of 4 images alone differ
    # from the same 4 inside 11 by ~1e-8), which is not what this test is about
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 4),
                         nn.ReLU()).double().eval()


def dataset():
    gen = torch.Generator().manual_seed(0)
    n = sum(SPLIT)
    images = torch.rand(STEPS, n, 3, 6, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, K, (STEPS, n), generator=gen)
    indices = torch.stack([torch.randperm(30, generator=gen)[:n] for _ in range(STEPS)])
    return images, labels, indices


def run(images, labels, indices, part=slice(None)):
    """Per-step SI (every layer) and the final compute() of a tracker fed ``part`` of each step."""
    net = model()
    split_labels = torch.randint(0, K, (30,), generator=torch.Generator().manual_seed(5))
    tracker = SelectivityTracker(net, K, "relu", incremental=True, dataset_labels=split_labels,
                                 null_permutations=NULLS)
    per_step = []
    with torch.no_grad():
        for x, y, i in zip(images, labels, indices):
            with tracker.track(y[part], i[part]):
                net(x[part])
            per_step.append(torch.stack(list(tracker.step_si().values())))
    result = tracker.compute()
    return torch.stack(per_step), {n: (r.si, r.null_si) for n, r in result.items()}


def worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        lo = sum(SPLIT[:rank])
        torch.save(run(*dataset(), slice(lo, lo + SPLIT[rank])), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_per_step_si_under_ddp_equals_one_process(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    per_step, final = run(*dataset())
    assert not torch.allclose(run(*dataset(), slice(0, SPLIT[0]))[0], per_step)  # one rank's images alone differ
    for rank in range(2):
        got_steps, got_final = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got_steps, per_step, rtol=1e-12, atol=1e-12)
        for name, (si, null_si) in final.items():
            torch.testing.assert_close(got_final[name][0], si, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got_final[name][1], null_si, rtol=1e-12, atol=1e-12)


def test_all_gather_batch_is_the_input_without_a_process_group():
    assert not dist.is_initialized()
    means, labels = torch.rand(3, 4), torch.tensor([[0, 1, 2]])
    got_means, got_labels = all_gather_batch(means, labels)
    assert got_means is means and got_labels is labels
