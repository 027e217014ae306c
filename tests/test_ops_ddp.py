"""selectivity.reduce.all_reduce_states under a real process group (gloo, 2 CPU processes): the
reduced state equals the single-process state over the same images, with an uneven split."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from selectivity import ops
from selectivity.reduce import all_reduce_states

SPLIT = (7, 4)  # images on rank 0 and rank 1
K = 5


def dataset():
    """Two tracked layers: a channels_last conv output and a [B, U] output."""
    gen = torch.Generator().manual_seed(0)
    n = sum(SPLIT)
    acts = [torch.rand(n, 6, 3, 3, generator=gen).to(memory_format=torch.channels_last), torch.rand(n, 4, generator=gen)]
    return acts, torch.randint(0, K, (n,), generator=gen)


def accumulate_all(acts, labels):
    states = [ops.new_state(K, a.shape[1]) for a in acts]
    for act, state in zip(acts, states):
        ops.accumulate(act, labels, *state)
    return states


def worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        acts, labels = dataset()
        lo = sum(SPLIT[:rank])
        mine = slice(lo, lo + SPLIT[rank])
        states = accumulate_all([a[mine] for a in acts], labels[mine])
        all_reduce_states(states)
        torch.save(states, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_all_reduce_states_equals_single_process(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    expected = accumulate_all(*dataset())
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for (sums, counts), (expected_sums, expected_counts) in zip(got, expected):
            assert counts.dtype == torch.int64 and torch.equal(counts, expected_counts)
            torch.testing.assert_close(sums, expected_sums, rtol=1e-12, atol=1e-14)
            assert torch.equal(ops.selectivity_index(sums, counts).pref_class,
                               ops.selectivity_index(expected_sums, expected_counts).pref_class)


def test_all_reduce_states_is_a_no_op_without_a_process_group():
    assert not dist.is_initialized()
    states = accumulate_all(*dataset())
    before = [(s.clone(), c.clone()) for s, c in states]
    all_reduce_states(states)
    for (sums, counts), (sums0, counts0) in zip(states, before):
        assert torch.equal(sums, sums0) and torch.equal(counts, counts0)
